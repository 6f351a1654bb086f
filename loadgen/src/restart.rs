//! `kind = "drain-after-restart"`: how fast a backlog that outlived the broker process drains
//! from disk, next to the same backlog drained hot and to the disk's own O_DIRECT read speed.
//!
//! Contract: `run` is called on the main thread, which owns the spawned broker (the broker's
//! `PR_SET_PDEATHSIG` ties it to the thread that started it, so the restart happens here). The
//! steps, in order:
//!
//! 1. *hot fill*: declare the queues; the producers publish `backlog` messages between them,
//!    closed loop (`in_flight` unconfirmed each, the scenario's `idiom`), with no consumer, and
//!    wait for every confirm;
//! 2. *hot drain*: the consumers start and take the backlog (`prefetch`, acks by `idiom`); timed
//!    from their subscribing to the last expected delivery; then the queues are watched until
//!    nothing is ready or unacked;
//! 3. *cold fill*: as 1 (new sequence numbers, so the ledger spans both);
//! 4. *restart*: every connection closed, SIGTERM, the exit awaited; the raw read (below); the
//!    same broker started on the same data directory (new ports);
//! 5. *cold drain*: new connections to the new address (the client reconnects), then as 2.
//!
//! The *raw read* reads every journal segment file (`*.seg` under the data directory) in name
//! order with O_DIRECT, 1 MiB at a time into a 4 KiB-aligned buffer, each file up to the first
//! chunk that starts with a zero block (the log's end: the rest is preallocated and never
//! written, and an unwritten extent reads as zeros without touching the disk, which would
//! flatter the number). It runs while the broker is down, so nothing else uses the disk.
//!
//! The load of steps 1-3 and of step 5 runs on one OS thread each (pinned to the first load
//! CPU given, never the main thread: a broker started from a pinned thread would inherit its
//! affinity), with its own tokio current-thread runtime and connections (one per producer and
//! per consumer, one admin). Rates: messages / seconds, and body bytes / seconds in MB/s (10^6
//! bytes). The loss ledger (`crate::stats`) spans the whole run: every confirmed message must be
//! delivered, once, over both drains.
//!
//! Faults handled: a broker that does not stop on SIGTERM (SIGKILLed, said in the report, the run
//! goes on: that restart is a crash's), one that does not come back (the error ends the run, its
//! data removed), publishes refused (counted as failures, not waited for), a drain that does not
//! finish within `drain_timeout_s` (the run is incomplete, the ledger reports what is missing as
//! undelivered, not lost, unless the queues were seen empty), O_DIRECT refused by the file
//! system (the raw read reports the error; the drains are still measured), Ctrl-C (the step
//! under way stops, the report says so).

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::future::Future;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Semaphore};
use weir_client::{Client, ConsumeOptions, Delivery, Message, PublishFuture};

use crate::broker::SpawnedBroker;
use crate::run::{cleanup, connect, declare, BrokerFacts, RunConfig};
use crate::scenario::{Idiom, Scenario, Size, HEADER_LEN};
use crate::stats::{check, Check, Header, Recorder};

/// The raw read's chunk: large and aligned, as a read-ahead would be.
pub const RAW_CHUNK: usize = 1 << 20;
/// O_DIRECT alignment of buffer, offset and length (the journal's block).
const RAW_ALIGN: usize = 4096;
/// How often the queues are looked at while waiting for the acks to land.
const EMPTY_POLL: Duration = Duration::from_millis(10);
/// A partial ack group (`idiom = "batch"`) is sent after this long without a delivery.
const ACK_FLUSH: Duration = Duration::from_millis(5);

/// One timed step.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Step {
    /// Messages (fill: confirmed; drain: delivered).
    pub messages: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// Seconds (fill: first publish to last confirm; drain: subscribing to last delivery).
    pub seconds: f64,
    /// messages / seconds.
    pub msgs_per_s: f64,
    /// bytes / seconds / 10^6.
    pub mb_per_s: f64,
}

impl Step {
    fn new(messages: u64, bytes: u64, seconds: f64) -> Step {
        let per_s = |n: u64| {
            if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            }
        };
        Step {
            messages,
            bytes,
            seconds,
            msgs_per_s: per_s(messages),
            mb_per_s: per_s(bytes) / 1e6,
        }
    }
}

/// The raw O_DIRECT read of the segment files.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RawRead {
    /// Segment files read.
    pub files: u64,
    /// Bytes read (up to each file's log end).
    pub bytes: u64,
    /// Seconds, opening the files included.
    pub seconds: f64,
    /// bytes / seconds / 10^6.
    pub mb_per_s: f64,
    /// Bytes per read.
    pub chunk_bytes: u64,
    /// Why it could not be done (O_DIRECT refused, no segment files), if so.
    pub error: Option<String>,
}

/// What a drain-after-restart run found; `results.json` with `--out`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestartReport {
    pub scenario: String,
    pub description: String,
    pub settings: Scenario,
    /// The broker before the restart.
    pub broker: BrokerFacts,
    pub broker_setup: String,
    pub loadgen_pinning: Vec<String>,
    pub machine: String,
    pub hot_fill: Step,
    pub hot_drain: Step,
    pub cold_fill: Step,
    pub cold_drain: Step,
    /// How the broker stopped ("stopped by SIGTERM (exit status: 0)").
    pub stopped: String,
    /// SIGTERM to exit, s.
    pub stop_s: f64,
    /// Start to the ready line on the same data directory, s.
    pub start_s: f64,
    pub raw_read: RawRead,
    pub check: Check,
    pub publish_failures: u64,
    pub first_failure: Option<String>,
    /// Both drains delivered what was confirmed and the queues were seen empty after each.
    pub drained: bool,
    pub aborted: bool,
}

impl RestartReport {
    /// The printed report.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "weir-loadgen: {}", self.scenario);
        if !self.description.is_empty() {
            let _ = writeln!(out, "  {}", self.description);
        }
        let _ = writeln!(
            out,
            "broker    weir {} at {}: {} shard(s), fsync {}; {}",
            self.broker.version,
            self.broker.addr,
            self.broker.shards,
            self.broker.fsync,
            self.broker_setup
        );
        let _ = writeln!(out, "loadgen   {}", self.loadgen_pinning.join("; "));
        let _ = writeln!(
            out,
            "workload  {}, backlog {}",
            crate::report::workload_line(&self.settings),
            self.settings.backlog()
        );
        let _ = writeln!(out, "machine   {}", self.machine);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<34} {:>10} {:>10} {:>10} {:>10}",
            "step", "messages", "time (s)", "msgs/s", "MB/s"
        );
        for (name, s) in [
            ("hot fill (publish, all confirmed)", &self.hot_fill),
            ("hot drain (no restart)", &self.hot_drain),
            ("cold fill", &self.cold_fill),
            ("cold drain (after the restart)", &self.cold_drain),
        ] {
            let _ = writeln!(
                out,
                "{:<34} {:>10} {:>10.3} {:>10.0} {:>10.1}",
                name, s.messages, s.seconds, s.msgs_per_s, s.mb_per_s
            );
        }
        let _ = writeln!(
            out,
            "restart   {}: SIGTERM -> exit {:.3} s, start -> ready {:.3} s (same data directory)",
            self.stopped, self.stop_s, self.start_s
        );
        let r = &self.raw_read;
        match &r.error {
            None => {
                let _ = writeln!(
                    out,
                    "raw O_DIRECT read  {} segment file(s), {} bytes in {} KiB reads: {:.3} s, {:.1} MB/s",
                    r.files,
                    r.bytes,
                    r.chunk_bytes / 1024,
                    r.seconds,
                    r.mb_per_s
                );
            }
            Some(e) => {
                let _ = writeln!(out, "raw O_DIRECT read  not done: {e}");
            }
        }
        let ratio = |x: f64, y: f64| {
            if y > 0.0 {
                format!("{:.2}", x / y)
            } else {
                "-".to_string()
            }
        };
        let _ = writeln!(
            out,
            "drain     hot {:.1} MB/s, after the restart {:.1} MB/s vs raw read {} (cold/hot {}, cold/raw {})",
            self.hot_drain.mb_per_s,
            self.cold_drain.mb_per_s,
            if r.error.is_none() {
                format!("{:.1} MB/s", r.mb_per_s)
            } else {
                "-".to_string()
            },
            ratio(self.cold_drain.mb_per_s, self.hot_drain.mb_per_s),
            ratio(self.cold_drain.mb_per_s, r.mb_per_s)
        );
        let c = &self.check;
        let _ = writeln!(
            out,
            "check     confirmed {}, delivered {} (distinct; {} deliveries), lost {}, duplicated {}, \
             redelivered {}, out of order {}, publish failures {}{}",
            c.confirmed,
            c.delivered_unique,
            c.deliveries,
            c.lost,
            c.duplicated,
            c.redelivered,
            c.out_of_order,
            self.publish_failures,
            if c.undelivered_not_drained > 0 {
                format!(
                    ", not delivered {} (a drain did not finish: still queued or lost)",
                    c.undelivered_not_drained
                )
            } else {
                String::new()
            }
        );
        for d in &c.details {
            let _ = writeln!(out, "          {d}");
        }
        if let Some(f) = &self.first_failure {
            let _ = writeln!(out, "          first failure: {f}");
        }
        if self.aborted {
            let _ = writeln!(out, "run       stopped by a signal");
        }
        out
    }
}

/// Runs the steps against `broker` (see the module's contract). `setup` describes how the broker
/// was started; `cpu` is where the load threads are pinned.
pub fn run(
    cfg: &RunConfig,
    broker: &mut SpawnedBroker,
    setup: &str,
    machine: &str,
    abort: Arc<AtomicBool>,
) -> Result<RestartReport, String> {
    let s = &cfg.scenario;
    let cpu = cfg.thread_cpus.first().copied().flatten();
    let mut pinning = vec![match cpu {
        Some(c) => format!("one load thread per step, pinned to cpu {c}"),
        None => "one load thread per step, not pinned".to_string(),
    }];
    if cfg.thread_cpus.len() > 1 {
        pinning.push(format!(
            "{} load threads asked for: drain-after-restart uses one",
            cfg.thread_cpus.len()
        ));
    }
    let addr = broker.listen.clone();
    let before = on_load_thread(cpu, || before_restart(cfg, addr, abort.clone()))??;
    let Before {
        facts,
        queues,
        mut recorder,
        hot_fill,
        hot_drain,
        cold_fill,
        mut drained,
    } = before;

    let aborted = abort.load(Ordering::Relaxed);
    let (mut stopped, mut stop_s, mut start_s) = (String::from("not restarted"), 0.0, 0.0);
    let mut raw_read = RawRead {
        chunk_bytes: RAW_CHUNK as u64,
        error: Some("not done (the run stopped before the restart)".into()),
        ..RawRead::default()
    };
    let mut cold_drain = Step::default();
    if !aborted {
        let t = Instant::now();
        stopped = broker.terminate()?;
        stop_s = t.elapsed().as_secs_f64();
        raw_read = match broker.data_dir() {
            Some(dir) => raw_read_segments(dir),
            None => RawRead {
                error: Some("the data directory is unknown".into()),
                ..RawRead::default()
            },
        };
        let t = Instant::now();
        broker.start_again()?;
        start_s = t.elapsed().as_secs_f64();
        println!("broker ready again: {}", broker.ready_line);
        let addr = broker.listen.clone();
        let expected = cold_fill.messages;
        let (rec, step, ok) = on_load_thread(cpu, || {
            after_restart(cfg, addr, queues.clone(), expected, abort.clone())
        })??;
        recorder.merge(rec);
        cold_drain = step;
        drained &= ok;
    }
    let drained = drained && !aborted;
    Ok(RestartReport {
        scenario: cfg.name.clone(),
        description: s.description.clone(),
        settings: s.clone(),
        broker: facts,
        broker_setup: setup.to_string(),
        loadgen_pinning: pinning,
        machine: machine.to_string(),
        hot_fill,
        hot_drain,
        cold_fill,
        cold_drain,
        stopped,
        stop_s,
        start_s,
        raw_read,
        check: check(&recorder, &queues, drained),
        publish_failures: recorder.publish_failures,
        first_failure: recorder.first_failure.clone(),
        drained,
        aborted: abort.load(Ordering::Relaxed),
    })
}

/// Runs `f`'s future on a new OS thread (pinned to `cpu`) with its own current-thread runtime.
fn on_load_thread<T, F, Fut>(cpu: Option<usize>, f: F) -> Result<T, String>
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
{
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
                Ok(local.block_on(&rt, f()))
            })
            .map_err(|e| format!("starting the load thread: {e}"))?;
        h.join()
            .map_err(|_| "the load thread panicked".to_string())?
    })
}

/// Steps 1-3's results.
struct Before {
    facts: BrokerFacts,
    queues: Vec<String>,
    recorder: Recorder,
    hot_fill: Step,
    hot_drain: Step,
    cold_fill: Step,
    drained: bool,
}

/// Steps 1-3: declare, fill, drain, fill; every connection closed at the end.
async fn before_restart(
    cfg: &RunConfig,
    addr: String,
    abort: Arc<AtomicBool>,
) -> Result<Before, String> {
    let s = &cfg.scenario;
    let admin = connect(&addr, "weir-loadgen-admin").await?;
    let server = admin.server().clone();
    let facts = BrokerFacts {
        version: server.broker_version.clone(),
        shards: server.shard_count,
        fsync: format!("{:?}", server.durability).to_lowercase(),
        addr: addr.clone(),
    };
    if (s.size.max() as usize) + 512 > server.limits.message_size_max as usize {
        return Err(format!(
            "size {} does not fit the broker's message_size_max {}",
            s.size, server.limits.message_size_max
        ));
    }
    let (queues, _) = declare(&admin, cfg).await?;
    let rec = Rc::new(RefCell::new(Recorder::new(vec![0.0])));
    let load = Load {
        s: Rc::new(s.clone()),
        queues: queues.clone(),
        rec: rec.clone(),
        abort,
    };
    let share = |p: u32| {
        let (n, b) = (u64::from(s.producers), s.backlog());
        b / n + u64::from(u64::from(p) < b % n)
    };
    println!("hot fill: {} messages, no consumer", s.backlog());
    let hot_fill = load.fill(&addr, 0, &share).await?;
    println!("hot drain");
    let (hot_drain, mut drained) = load.drain(&addr, &admin, hot_fill.messages).await?;
    println!("cold fill: {} messages, no consumer", s.backlog());
    let cold_fill = load.fill(&addr, 1, &share).await?;
    if !cfg.keep_queues && load.abort.load(Ordering::Relaxed) {
        cleanup(&admin, cfg, &queues, "").await;
        drained = false;
    }
    let _ = admin.close().await;
    drop(load);
    let recorder = Rc::try_unwrap(rec)
        .map_err(|_| "a load task still holds the recorder".to_string())?
        .into_inner();
    Ok(Before {
        facts,
        queues,
        recorder,
        hot_fill,
        hot_drain,
        cold_fill,
        drained,
    })
}

/// Step 5: the cold drain on new connections, then the queues deleted.
async fn after_restart(
    cfg: &RunConfig,
    addr: String,
    queues: Vec<String>,
    expected: u64,
    abort: Arc<AtomicBool>,
) -> Result<(Recorder, Step, bool), String> {
    let admin = connect(&addr, "weir-loadgen-admin").await?;
    let rec = Rc::new(RefCell::new(Recorder::new(vec![0.0])));
    let load = Load {
        s: Rc::new(cfg.scenario.clone()),
        queues: queues.clone(),
        rec: rec.clone(),
        abort,
    };
    println!("cold drain: {expected} messages, from disk");
    let (step, drained) = load.drain(&addr, &admin, expected).await?;
    cleanup(&admin, cfg, &queues, "").await;
    let _ = admin.close().await;
    drop(load);
    let recorder = Rc::try_unwrap(rec)
        .map_err(|_| "a load task still holds the recorder".to_string())?
        .into_inner();
    Ok((recorder, step, drained))
}

/// What the load tasks of one thread share.
struct Load {
    s: Rc<Scenario>,
    queues: Vec<String>,
    rec: Rc<RefCell<Recorder>>,
    abort: Arc<AtomicBool>,
}

impl Load {
    /// Producer `p` publishes `share(p)` messages (sequences after those of earlier fills) to
    /// queue `p % queues`; returns once every confirm (or refusal) is in.
    async fn fill(
        &self,
        addr: &str,
        round: u64,
        share: &dyn Fn(u32) -> u64,
    ) -> Result<Step, String> {
        let mut clients = Vec::new();
        for p in 0..self.s.producers {
            clients.push(connect(addr, &format!("weir-loadgen-producer-{p}")).await?);
        }
        let bytes = Rc::new(Cell::new(0u64));
        let confirmed = Rc::new(Cell::new(0u64));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (p, client) in clients.into_iter().enumerate() {
            let p = p as u32;
            let q = p as usize % self.queues.len();
            let task = Fill {
                p,
                q: q as u16,
                queue: self.queues[q].clone(),
                first_seq: round * share(p),
                count: share(p),
                s: self.s.clone(),
                rec: self.rec.clone(),
                abort: self.abort.clone(),
                bytes: bytes.clone(),
                confirmed: confirmed.clone(),
            };
            tasks.push(tokio::task::spawn_local(task.run(client)));
        }
        for t in tasks {
            t.await.map_err(|e| format!("a producer failed: {e}"))?;
        }
        Ok(Step::new(
            confirmed.get(),
            bytes.get(),
            start.elapsed().as_secs_f64(),
        ))
    }

    /// The consumers take `expected` messages; timed from subscribing to the last of them. Then
    /// the queues are watched until nothing is ready or unacked. Returns the step and whether
    /// it drained (everything expected delivered and the queues seen empty).
    async fn drain(
        &self,
        addr: &str,
        admin: &Client,
        expected: u64,
    ) -> Result<(Step, bool), String> {
        let s = &self.s;
        let mut clients = Vec::new();
        for c in 0..s.consumers {
            clients.push(connect(addr, &format!("weir-loadgen-consumer-{c}")).await?);
        }
        let counts = Rc::new(Cell::new((0u64, 0u64)));
        let last = Rc::new(Cell::new(None::<Instant>));
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop_tx = Rc::new(stop_tx);
        let deadline = Instant::now() + Duration::from_secs_f64(s.drain_timeout_s);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (c, client) in clients.into_iter().enumerate() {
            let c = c as u32;
            let q = c as usize % self.queues.len();
            let task = Drain {
                c,
                q: q as u16,
                queue: self.queues[q].clone(),
                expected,
                s: s.clone(),
                rec: self.rec.clone(),
                counts: counts.clone(),
                last: last.clone(),
                stop_tx: stop_tx.clone(),
                stop: stop_rx.clone(),
            };
            tasks.push(tokio::task::spawn_local(task.run(client)));
        }
        if expected == 0 {
            let _ = stop_tx.send(true);
        }
        let mut stop = stop_rx;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            if *stop.borrow() {
                break;
            }
            tokio::select! {
                _ = stop.changed() => {}
                _ = tick.tick() => {}
            }
            if self.abort.load(Ordering::Relaxed) || Instant::now() >= deadline {
                let _ = stop_tx.send(true);
            }
        }
        let mut failed = None;
        for t in tasks {
            if let Err(e) = t.await {
                failed.get_or_insert(format!("a consumer failed: {e}"));
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let (n, bytes) = counts.get();
        let end = last.get().unwrap_or_else(Instant::now);
        let step = Step::new(n, bytes, end.saturating_duration_since(start).as_secs_f64());
        // The acks' own time to land, however long the drain itself took.
        let empty = self
            .wait_empty(
                admin,
                deadline.max(Instant::now() + Duration::from_secs(10)),
            )
            .await;
        Ok((step, n >= expected && empty))
    }

    /// Waits until every queue has nothing ready and nothing unacked (the acks landed), or the
    /// deadline, or Ctrl-C; says whether they were seen empty.
    async fn wait_empty(&self, admin: &Client, deadline: Instant) -> bool {
        loop {
            let mut empty = true;
            for q in &self.queues {
                match admin.queue_info(q).await {
                    Ok(i) if i.messages_ready + i.messages_unacked == 0 => {}
                    _ => empty = false,
                }
            }
            if empty {
                return true;
            }
            if Instant::now() >= deadline || self.abort.load(Ordering::Relaxed) {
                return false;
            }
            tokio::time::sleep(EMPTY_POLL).await;
        }
    }
}

/// One producer of a fill.
struct Fill {
    p: u32,
    q: u16,
    queue: String,
    first_seq: u64,
    count: u64,
    s: Rc<Scenario>,
    rec: Rc<RefCell<Recorder>>,
    abort: Arc<AtomicBool>,
    bytes: Rc<Cell<u64>>,
    confirmed: Rc<Cell<u64>>,
}

impl Fill {
    async fn run(self, client: Client) {
        let s = &self.s;
        let window = Rc::new(Semaphore::new(s.in_flight as usize));
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<(u64, u64, PublishFuture)>>();
        let confirms = async {
            while let Some(frame) = rx.recv().await {
                let n = frame.len();
                for (seq, len, f) in frame {
                    match f.await {
                        Ok(_) => {
                            self.rec.borrow_mut().confirmed(&[self.q], self.p, seq);
                            self.confirmed.set(self.confirmed.get() + 1);
                            self.bytes.set(self.bytes.get() + len);
                        }
                        Err(e) => self
                            .rec
                            .borrow_mut()
                            .failed(&format!("producer {}: publish: {e}", self.p)),
                    }
                }
                window.add_permits(n);
            }
        };
        let sending = async {
            let mut seq = self.first_seq;
            let end = self.first_seq + self.count;
            while seq < end && !self.abort.load(Ordering::Relaxed) {
                let n = (end - seq).min(u64::from(s.batch));
                match window.acquire_many(n as u32).await {
                    Ok(permit) => permit.forget(),
                    Err(_) => break,
                }
                let messages: Vec<(u64, Message)> = (seq..seq + n)
                    .map(|k| {
                        let body = body(self.p, k, size_of(s.size, self.p, k));
                        (body.len() as u64, Message::new(body).persistent(true))
                    })
                    .collect();
                let lens: Vec<u64> = messages.iter().map(|(l, _)| *l).collect();
                let published = match s.idiom {
                    Idiom::Batch => {
                        client
                            .publish_batch(&self.queue, messages.into_iter().map(|(_, m)| m))
                            .await
                    }
                    // One call per message, as an application publishes (`batch` is 1 here).
                    Idiom::PerMessage => {
                        let mut futures = Vec::with_capacity(messages.len());
                        let mut failed = None;
                        for (_, m) in messages {
                            match client.publish(&self.queue, m).await {
                                Ok(f) => futures.push(f),
                                Err(e) => {
                                    failed = Some(e);
                                    break;
                                }
                            }
                        }
                        failed.map_or(Ok(futures), Err)
                    }
                };
                match published {
                    Ok(futures) => {
                        let frame = (seq..seq + n)
                            .zip(lens)
                            .zip(futures)
                            .map(|((k, l), f)| (k, l, f))
                            .collect();
                        let _ = tx.send(frame);
                    }
                    Err(e) => {
                        let mut r = self.rec.borrow_mut();
                        for _ in 0..n {
                            r.failed(&format!("producer {}: publish: {e}", self.p));
                        }
                        break;
                    }
                }
                seq += n;
            }
            drop(tx);
        };
        tokio::join!(sending, confirms);
        let _ = client.close().await;
    }
}

/// One consumer of a drain.
struct Drain {
    c: u32,
    q: u16,
    queue: String,
    expected: u64,
    s: Rc<Scenario>,
    rec: Rc<RefCell<Recorder>>,
    /// (deliveries, body bytes) over every consumer of this drain.
    counts: Rc<Cell<(u64, u64)>>,
    /// When the last expected delivery came.
    last: Rc<Cell<Option<Instant>>>,
    stop_tx: Rc<watch::Sender<bool>>,
    stop: watch::Receiver<bool>,
}

impl Drain {
    async fn run(mut self, client: Client) {
        let s = self.s.clone();
        let options = ConsumeOptions {
            prefetch: s.prefetch,
            ..ConsumeOptions::default()
        };
        let mut consumer = match client.consume(&self.queue, options).await {
            Ok(c) => c,
            Err(e) => {
                self.rec.borrow_mut().failed(&format!(
                    "consumer {}: consuming {}: {e}",
                    self.c, self.queue
                ));
                let _ = self.stop_tx.send(true);
                return;
            }
        };
        let mut unacked: Vec<Delivery> = Vec::new();
        loop {
            if *self.stop.borrow() {
                break;
            }
            let got = tokio::select! {
                d = consumer.recv() => d,
                _ = tokio::time::sleep(ACK_FLUSH), if !unacked.is_empty() => {
                    drop(Delivery::ack_all(&unacked));
                    unacked.clear();
                    continue;
                }
                _ = self.stop.changed() => break,
            };
            let d = match got {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    self.rec
                        .borrow_mut()
                        .failed(&format!("consumer {}: {e}", self.c));
                    break;
                }
                None => break,
            };
            match Header::read(d.body()) {
                Some(h) => self
                    .rec
                    .borrow_mut()
                    .delivered(self.c, self.q, &h, d.redelivered()),
                None => self.rec.borrow_mut().foreign += 1,
            }
            let (n, b) = self.counts.get();
            let n = n + 1;
            self.counts.set((n, b + d.body().len() as u64));
            if n == self.expected {
                self.last.set(Some(Instant::now()));
                let _ = self.stop_tx.send(true);
            }
            match s.idiom {
                // Each delivery acked on its own, the answer not awaited.
                Idiom::PerMessage => drop(d.ack()),
                Idiom::Batch => {
                    unacked.push(d);
                    if unacked.len() >= s.ack_batch as usize {
                        drop(Delivery::ack_all(&unacked));
                        unacked.clear();
                    }
                }
            }
        }
        if !unacked.is_empty() {
            let _ = Delivery::ack_all(&unacked).await;
        }
        let _ = consumer.cancel().await;
        let _ = client.close().await;
    }
}

/// Message `seq`'s size: fixed, or drawn from the range by a hash of (producer, seq), so that
/// it does not depend on the order anything ran in.
fn size_of(size: Size, p: u32, seq: u64) -> usize {
    match size {
        Size::Fixed(n) => n as usize,
        Size::Uniform { min, max } => {
            let mut x = (u64::from(p) << 40) ^ seq ^ 0x9e37_79b9_7f4a_7c15;
            x ^= x >> 33;
            x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
            x ^= x >> 33;
            min as usize + (x % (u64::from(max - min) + 1)) as usize
        }
    }
}

fn body(p: u32, seq: u64, len: usize) -> Bytes {
    let mut b = vec![0xa5u8; len.max(HEADER_LEN)];
    Header {
        producer: p,
        seq,
        intended_ns: 0,
        phase: 0,
        route: 0,
    }
    .write(&mut b);
    Bytes::from(b)
}

/// Reads every `*.seg` file under `dir` (see the module's contract); the error, if any, is in
/// the result.
pub fn raw_read_segments(dir: &Path) -> RawRead {
    let mut r = RawRead {
        chunk_bytes: RAW_CHUNK as u64,
        ..RawRead::default()
    };
    let mut files = Vec::new();
    if let Err(e) = segment_files(dir, &mut files) {
        r.error = Some(format!("listing {}: {e}", dir.display()));
        return r;
    }
    files.sort();
    if files.is_empty() {
        r.error = Some(format!("no segment files (*.seg) under {}", dir.display()));
        return r;
    }
    let mut buf = vec![0u8; RAW_CHUNK + RAW_ALIGN];
    let off = buf.as_ptr().align_offset(RAW_ALIGN);
    let chunk = &mut buf[off..off + RAW_CHUNK];
    let start = Instant::now();
    for path in &files {
        match read_direct(path, chunk) {
            Ok(n) => r.bytes += n,
            Err(e) => {
                r.error = Some(format!("{}: {e}", path.display()));
                return r;
            }
        }
        r.files += 1;
    }
    r.seconds = start.elapsed().as_secs_f64();
    if r.seconds > 0.0 {
        r.mb_per_s = r.bytes as f64 / r.seconds / 1e6;
    }
    r
}

/// One file with O_DIRECT, chunk by chunk, up to the log's end; the bytes read before it.
fn read_direct(path: &Path, chunk: &mut [u8]) -> std::io::Result<u64> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut pos = 0u64;
    loop {
        let n = file.read_at(chunk, pos)?;
        // A chunk that starts with a zero block is past the log's end (commits are contiguous,
        // and block 0 is the segment header): the rest of the file was preallocated.
        if n == 0 || chunk[..n.min(RAW_ALIGN)].iter().all(|b| *b == 0) {
            return Ok(pos);
        }
        pos += n as u64;
        if n < chunk.len() {
            return Ok(pos);
        }
    }
}

fn segment_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        if e.file_type()?.is_dir() {
            segment_files(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "seg") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_read_stops_at_the_log_end_of_each_segment() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let shard = dir.path().join("shard-0");
        std::fs::create_dir(&shard).expect("shard dir");
        // 2.5 chunks of log, then zeros to 4 chunks (as preallocated): the chunk holding the
        // log's end is read whole, the one after it is where reading stops.
        let mut data = vec![0x5au8; RAW_CHUNK * 5 / 2];
        data.resize(RAW_CHUNK * 4, 0);
        std::fs::write(shard.join("0000000000000000.seg"), &data).expect("write");
        std::fs::write(shard.join("reserve"), vec![1u8; 8192]).expect("write");
        let r = raw_read_segments(dir.path());
        if let Some(e) = &r.error {
            // tmpfs and some others refuse O_DIRECT: nothing to check here then.
            assert!(e.contains("0000000000000000.seg"), "{e}");
            return;
        }
        assert_eq!(r.files, 1);
        assert_eq!(r.bytes, (RAW_CHUNK * 3) as u64);
    }

    #[test]
    fn uniform_sizes_stay_in_range() {
        for seq in 0..1000 {
            let n = size_of(Size::Uniform { min: 40, max: 50 }, 3, seq);
            assert!((40..=50).contains(&n), "{n}");
        }
        assert_eq!(size_of(Size::Fixed(1024), 0, 7), 1024);
    }
}
