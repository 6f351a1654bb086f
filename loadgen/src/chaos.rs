//! `--chaos`: a scenario against a spawned broker that is SIGKILLed and restarted at random
//! moments, and a check of the durability promise on this disk and kernel: no confirmed message
//! lost, no message whose ack was answered delivered again (resurrected), nothing delivered that
//! was never published; with duplicates (at-least-once redeliveries after a crash) and the time
//! each restart took (SIGKILL to the ready line) reported.
//!
//! Contract: `run` is called on the main thread, which owns the spawned broker (its
//! `PR_SET_PDEATHSIG` ties it to the thread that started it, so every restart happens here). The
//! kill moments are drawn from `seed` before the run, uniformly over the publishing phases, and
//! happen in order; each SIGKILL is followed at once by a restart on the same data directory
//! (new ephemeral ports, published to the load through a `watch` channel: `None` while the broker
//! is down). The load runs on one other thread, a tokio current-thread runtime: the scenario's
//! producers (its schedule, open loop; `max`: closed loop with `in_flight`) and consumers
//! (`prefetch`, `ack_batch`, `consumer_rate`/`process_ms`), each reconnecting whenever its
//! connection dies. A publish whose confirm never came is not retried (it is "unconfirmed",
//! and may or may not be delivered); acks always ask for an answer, and an answered ack makes its
//! message gone for good. The run ends when every producer is done and the queues are empty
//! (nothing ready, nothing unacked), or at `drain_timeout_s`.
//!
//! Faults handled: a broker that does not come back (the run ends with the error, the data
//! directory removed), connections refused while it restarts (retried every 20 ms), Ctrl-C (the
//! run stops at the next step and reports what it saw). `rpc` scenarios, transient queues and
//! non-persistent messages are refused: a crash may lose those by design.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{watch, Semaphore};
use weir_client::{Client, ClientError, ClientOptions, ConsumeOptions, Delivery, Message};
use weir_client::{PublishFuture, PublishOptions};

use crate::broker::SpawnedBroker;
use crate::run::{cleanup, declare, RunConfig};
use crate::scenario::{Idiom, Kind, Scenario, Size, HEADER_LEN};
use crate::stats::Header;

/// How often a dead connection is retried while the broker restarts.
const RECONNECT_EVERY: Duration = Duration::from_millis(20);
/// A partial ack group is sent after this long without a delivery.
const ACK_FLUSH: Duration = Duration::from_millis(5);

/// `--chaos-kills`, `--chaos-seed`.
#[derive(Debug, Clone, Copy)]
pub struct Chaos {
    pub kills: u32,
    pub seed: u64,
}

/// One SIGKILL and the restart after it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Kill {
    /// Seconds since the run's epoch.
    pub at_s: f64,
    /// SIGKILL to the restarted broker's ready line, ms.
    pub recovery_ms: f64,
}

/// What a chaos run found; `chaos.json` with `--out`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ChaosReport {
    pub scenario: String,
    pub seed: u64,
    /// The spawned broker's data directory (removed at the end).
    pub data_dir: String,
    pub kills_requested: u32,
    pub kills: Vec<Kill>,
    pub recovery_ms_p50: f64,
    pub recovery_ms_max: f64,
    /// (queue, message) pairs handed to the client (a fanout message counts once per queue).
    pub published: u64,
    pub confirmed: u64,
    /// Published, no confirm (the connection died first): may or may not be delivered.
    pub unconfirmed: u64,
    /// Distinct (queue, message) pairs delivered.
    pub delivered: u64,
    /// Unconfirmed messages that were delivered all the same.
    pub unconfirmed_delivered: u64,
    /// Confirmed and never delivered, in a run that drained: a broken promise.
    pub lost: u64,
    /// Confirmed and not delivered when a run that did not drain (stopped, timed out) ended:
    /// not judged.
    pub undelivered: u64,
    /// Delivered again while no ack of it had been answered (at-least-once after a crash).
    pub duplicated: u64,
    /// Delivered again after an ack of it was answered: a broken promise.
    pub resurrected: u64,
    /// Bodies that are no message of this run: a broken promise.
    pub never_published: u64,
    /// Acks answered `Ok`.
    pub acks_answered: u64,
    /// Connections (re)opened after a kill, producers and consumers together.
    pub reconnects: u64,
    /// Failures other than a dead connection (refusals, returns), and the first one's text.
    pub other_failures: u64,
    pub first_failure: Option<String>,
    /// The queues were seen empty at the end.
    pub drained: bool,
    pub aborted: bool,
    /// A few of the lost and resurrected, as "queue producer:sequence".
    pub examples: Vec<String>,
}

impl ChaosReport {
    /// Nothing confirmed lost, nothing resurrected, nothing foreign.
    pub fn promise_kept(&self) -> bool {
        self.lost == 0 && self.resurrected == 0 && self.never_published == 0
    }

    pub fn summary(&self) -> String {
        let kills: Vec<String> = self
            .kills
            .iter()
            .map(|k| format!("{:.2} s ({:.0} ms)", k.at_s, k.recovery_ms))
            .collect();
        let mut s = String::new();
        s.push_str(&format!(
            "chaos: {} of {} SIGKILLs (seed {}), at {}\n",
            self.kills.len(),
            self.kills_requested,
            self.seed,
            if kills.is_empty() {
                "-".to_string()
            } else {
                kills.join(", ")
            }
        ));
        s.push_str(&format!(
            "  recovery (SIGKILL -> ready): p50 {:.0} ms, max {:.0} ms\n",
            self.recovery_ms_p50, self.recovery_ms_max
        ));
        s.push_str(&format!(
            "  published {}, confirmed {}, unconfirmed {} ({} of them delivered anyway), delivered {}\n",
            self.published, self.confirmed, self.unconfirmed, self.unconfirmed_delivered, self.delivered
        ));
        s.push_str(&format!(
            "  lost {}, duplicated {}, resurrected {}, never published {}; acks answered {}; reconnects {}\n",
            self.lost, self.duplicated, self.resurrected, self.never_published, self.acks_answered, self.reconnects
        ));
        if !self.drained {
            s.push_str(&format!(
                "  {} confirmed messages not delivered when the run ended\n",
                self.undelivered
            ));
        }
        if self.other_failures > 0 {
            s.push_str(&format!(
                "  other failures {} (first: {})\n",
                self.other_failures,
                self.first_failure.as_deref().unwrap_or("?")
            ));
        }
        if !self.examples.is_empty() {
            s.push_str(&format!("  e.g. {}\n", self.examples.join(", ")));
        }
        s.push_str(&format!(
            "  {}\n",
            if !self.promise_kept() {
                "!!! the durability promise was broken !!!"
            } else if !self.drained {
                "the queues did not drain: incomplete (undelivered confirmed messages not judged)"
            } else {
                "the durability promise held"
            }
        ));
        s
    }
}

/// xorshift64*: kill moments and sizes, the same for the same seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
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

/// Refuses what a crash may lose by design.
pub fn check(s: &Scenario) -> Result<(), String> {
    if s.kind == Kind::Rpc {
        return Err("--chaos: rpc scenarios are not supported (replies are transient)".into());
    }
    if !s.durable || !s.persistent {
        return Err(
            "--chaos: needs durable queues and persistent messages (a crash loses the others by design)"
                .into(),
        );
    }
    if s.kind == Kind::DrainAfterRestart {
        return Err(
            "--chaos: kind = \"drain-after-restart\" restarts the broker itself; run it with \
             --spawn-broker alone"
                .into(),
        );
    }
    if s.idiom == Idiom::PerMessage {
        return Err(
            "--chaos: idiom = \"per-message\" is not run under --chaos (its acks always ask for \
             an answer there, to tell a resurrection from a redelivery); use idiom = \"batch\""
                .into(),
        );
    }
    Ok(())
}

/// One (queue, producer, sequence) as the load saw it.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    confirmed: bool,
    deliveries: u32,
    acked: bool,
}

type Key = (u16, u32, u64);

#[derive(Default)]
struct Ledger {
    messages: HashMap<Key, Seen>,
    duplicated: u64,
    resurrected: u64,
    never_published: u64,
    acks_answered: u64,
    reconnects: u64,
    other_failures: u64,
    first_failure: Option<String>,
    examples: Vec<String>,
}

impl Ledger {
    fn fail(&mut self, what: String) {
        self.other_failures += 1;
        self.first_failure.get_or_insert(what);
    }
    fn example(&mut self, what: String) {
        if self.examples.len() < 10 {
            self.examples.push(what);
        }
    }
}

type Led = Rc<RefCell<Ledger>>;

/// What the load thread shares with the main one.
struct Load {
    scenario: Scenario,
    queue_names: Vec<String>,
    exchange: String,
    phase_starts: Vec<f64>,
    producers_done: AtomicU32,
}

/// The run: declare, load with kills, drain, check.
pub fn run(
    cfg: &RunConfig,
    chaos: Chaos,
    broker: &mut SpawnedBroker,
    abort: Arc<AtomicBool>,
) -> Result<ChaosReport, String> {
    let s = &cfg.scenario;
    check(s)?;
    let admin_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    let admin_for = |addr: &str| {
        let addr = addr.to_string();
        local.block_on(&admin_rt, async move {
            Client::connect(
                addr.as_str(),
                ClientOptions {
                    name: "weir-loadgen-chaos-admin".into(),
                    ..ClientOptions::default()
                },
            )
            .await
            .map_err(|e| format!("connecting to the broker at {addr}: {e}"))
        })
    };
    let admin = admin_for(&broker.listen)?;
    let mut setup_cfg = cfg.clone();
    setup_cfg.addr = broker.listen.clone();
    let (queue_names, exchange) = local.block_on(&admin_rt, declare(&admin, &setup_cfg))?;
    drop(admin);

    let mut phase_starts = Vec::new();
    let mut t = 0.0;
    for p in &s.phases {
        phase_starts.push(t);
        t += p.duration_s;
    }
    let last = s.last_publishing_phase();
    let publishing_end_s = phase_starts[last] + s.phases[last].duration_s;
    let mut rng = Rng::new(chaos.seed);
    let mut kill_at: Vec<f64> = (0..chaos.kills)
        .map(|_| publishing_end_s * (0.1 + 0.8 * rng.unit()))
        .collect();
    kill_at.sort_by(f64::total_cmp);

    let load = Arc::new(Load {
        scenario: s.clone(),
        queue_names: queue_names.clone(),
        exchange: exchange.clone(),
        phase_starts,
        producers_done: AtomicU32::new(0),
    });
    let (addr_tx, addr_rx) = watch::channel(Some(broker.listen.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let epoch = Instant::now() + Duration::from_millis(50);
    let load_thread = {
        let (load, seed) = (load.clone(), chaos.seed);
        std::thread::Builder::new()
            .name("chaos-load".into())
            .spawn(move || load_thread(load, epoch, seed, addr_rx, stop_rx))
            .map_err(|e| format!("starting the load thread: {e}"))?
    };

    let mut report = ChaosReport {
        scenario: cfg.name.clone(),
        seed: chaos.seed,
        data_dir: broker
            .data_dir()
            .map_or(String::new(), |d| d.display().to_string()),
        kills_requested: chaos.kills,
        ..ChaosReport::default()
    };
    let aborted = || abort.load(Ordering::Relaxed);
    let mut restart_error = None;
    for at in kill_at {
        let when = epoch + Duration::from_secs_f64(at);
        while Instant::now() < when && !aborted() {
            std::thread::sleep((when - Instant::now()).min(Duration::from_millis(50)));
        }
        if aborted() {
            break;
        }
        // Down first, so that nothing reconnects to the dying broker's ports.
        let _ = addr_tx.send(None);
        let killed = Instant::now();
        if let Err(e) = broker.kill_and_restart() {
            restart_error = Some(e);
            break;
        }
        report.kills.push(Kill {
            at_s: killed.duration_since(epoch).as_secs_f64(),
            recovery_ms: killed.elapsed().as_secs_f64() * 1000.0,
        });
        let _ = addr_tx.send(Some(broker.listen.clone()));
    }

    // Every producer done, then the queues empty (or the drain timeout).
    let deadline = epoch + Duration::from_secs_f64(publishing_end_s + s.drain_timeout_s);
    let mut drained = false;
    if restart_error.is_none() {
        let admin = admin_for(&broker.listen)?;
        while !aborted() && Instant::now() < deadline {
            if load.producers_done.load(Ordering::Relaxed) >= s.producers {
                let empty = local.block_on(&admin_rt, async {
                    for q in &queue_names {
                        match admin.queue_info(q).await {
                            Ok(i) if i.messages_ready + i.messages_unacked == 0 => {}
                            _ => return false,
                        }
                    }
                    true
                });
                if empty {
                    drained = true;
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = stop_tx.send(true);
        let ledger = load_thread
            .join()
            .map_err(|_| "the load thread panicked".to_string())?;
        let cleanup_cfg = RunConfig {
            addr: broker.listen.clone(),
            ..cfg.clone()
        };
        local.block_on(
            &admin_rt,
            cleanup(&admin, &cleanup_cfg, &queue_names, &exchange),
        );
        finish(&mut report, ledger);
    } else {
        let _ = stop_tx.send(true);
        let _ = load_thread.join();
    }
    if let Some(e) = restart_error {
        return Err(format!("--chaos: the broker did not come back: {e}"));
    }
    report.drained = drained;
    report.aborted = aborted();
    if !drained {
        // Still in a queue, perhaps: only a drained run can say a message is lost.
        report.undelivered = std::mem::take(&mut report.lost);
        report.examples.retain(|e| !e.starts_with("lost"));
    }
    let mut rec: Vec<f64> = report.kills.iter().map(|k| k.recovery_ms).collect();
    rec.sort_by(f64::total_cmp);
    if !rec.is_empty() {
        report.recovery_ms_p50 = rec[(rec.len() - 1) / 2];
        report.recovery_ms_max = rec[rec.len() - 1];
    }
    Ok(report)
}

fn finish(report: &mut ChaosReport, ledger: Ledger) {
    let mut lost = Vec::new();
    for (k, m) in &ledger.messages {
        report.published += 1;
        if m.confirmed {
            report.confirmed += 1;
            if m.deliveries == 0 {
                lost.push(*k);
            }
        } else {
            report.unconfirmed += 1;
            if m.deliveries > 0 {
                report.unconfirmed_delivered += 1;
            }
        }
        if m.deliveries > 0 {
            report.delivered += 1;
        }
    }
    lost.sort_unstable();
    report.lost = lost.len() as u64;
    report.duplicated = ledger.duplicated;
    report.resurrected = ledger.resurrected;
    report.never_published = ledger.never_published;
    report.acks_answered = ledger.acks_answered;
    report.reconnects = ledger.reconnects;
    report.other_failures = ledger.other_failures;
    report.first_failure = ledger.first_failure;
    report.examples = ledger.examples;
    for (q, p, s) in lost.into_iter().take(10) {
        report.examples.push(format!("lost: queue {q} {p}:{s}"));
    }
}

fn load_thread(
    load: Arc<Load>,
    epoch: Instant,
    seed: u64,
    addr: watch::Receiver<Option<String>>,
    stop: watch::Receiver<bool>,
) -> Ledger {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let mut l = Ledger::default();
            l.fail(format!("starting the load runtime: {e}"));
            return l;
        }
    };
    let ledger: Led = Rc::default();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let mut tasks = Vec::new();
        for p in 0..load.scenario.producers {
            let (load, ledger, addr) = (load.clone(), ledger.clone(), addr.clone());
            let rng = Rng::new(seed ^ (u64::from(p) + 1) << 32);
            let stop = stop.clone();
            tasks.push(tokio::task::spawn_local(async move {
                produce(p, &load, epoch, rng, &ledger, addr, stop).await;
                load.producers_done.fetch_add(1, Ordering::Relaxed);
            }));
        }
        for c in 0..load.scenario.consumers {
            let (load, ledger, addr, stop) =
                (load.clone(), ledger.clone(), addr.clone(), stop.clone());
            tasks.push(tokio::task::spawn_local(async move {
                consume(c, &load, epoch, &ledger, addr, stop).await
            }));
        }
        for t in tasks {
            if let Err(e) = t.await {
                ledger.borrow_mut().fail(format!("a load task failed: {e}"));
            }
        }
    });
    drop(local);
    Rc::try_unwrap(ledger)
        .map(RefCell::into_inner)
        .unwrap_or_default()
}

/// A connection to the broker as it is now: waits while it is down, retries while it starts.
/// `None` once `stop` says so.
async fn connect(
    name: &str,
    addr: &mut watch::Receiver<Option<String>>,
    stop: &mut watch::Receiver<bool>,
) -> Option<Client> {
    loop {
        if *stop.borrow() {
            return None;
        }
        let current = addr.borrow_and_update().clone();
        match current {
            None => {
                tokio::select! {
                    r = addr.changed() => if r.is_err() { return None },
                    _ = stop.changed() => {}
                }
            }
            Some(a) => {
                let options = ClientOptions {
                    name: name.to_string(),
                    ..ClientOptions::default()
                };
                if let Ok(c) = Client::connect(a.as_str(), options).await {
                    return Some(c);
                }
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_EVERY) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// Where producer `p`'s frame number `n` goes: options, routing key, destination queues.
fn route(load: &Load, p: u32, n: u64) -> (PublishOptions, String, Vec<u16>) {
    let s = &load.scenario;
    let via = || PublishOptions {
        exchange: load.exchange.clone(),
        mandatory: false,
    };
    if s.kind == Kind::Fanout {
        return (via(), String::new(), (0..s.queues as u16).collect());
    }
    if let Some(x) = &s.exchange {
        let keys = &x.routing_keys;
        let k = &keys[((n + u64::from(p)) % keys.len() as u64) as usize];
        return (via(), k.clone(), x.destinations(k, s.queues));
    }
    let q = p as usize % load.queue_names.len();
    (
        PublishOptions::default(),
        load.queue_names[q].clone(),
        vec![q as u16],
    )
}

/// Producer `p`'s intended send times (s since the epoch) and phases: its share of every
/// phase's schedule. `max`: none (closed loop).
fn schedule(load: &Load, p: u32) -> Vec<(f64, usize)> {
    let s = &load.scenario;
    if s.kind == Kind::Max {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (i, phase) in s.phases.iter().enumerate() {
        let mut last = 0.0;
        for k in (u64::from(p)..phase.message_count()).step_by(s.producers as usize) {
            let t = phase.time_of(k, last);
            last = t;
            out.push((load.phase_starts[i] + t, i));
        }
    }
    out
}

async fn produce(
    p: u32,
    load: &Load,
    epoch: Instant,
    mut rng: Rng,
    ledger: &Led,
    mut addr: watch::Receiver<Option<String>>,
    mut stop: watch::Receiver<bool>,
) {
    let s = &load.scenario;
    let slots = schedule(load, p);
    let last = s.last_publishing_phase();
    let end_s = load.phase_starts[last] + s.phases[last].duration_s;
    // Closed loop (`max`): `in_flight` unconfirmed at most. Open loop: the schedule paces.
    let window = (s.kind == Kind::Max).then(|| Rc::new(Semaphore::new(s.in_flight as usize)));
    let name = format!("weir-loadgen-chaos-producer-{p}");
    let (mut next, mut seq, mut frames, mut first) = (0usize, 0u64, 0u64, true);
    let mut confirmers = Vec::new();
    'connection: while let Some(client) = connect(&name, &mut addr, &mut stop).await {
        if !first {
            ledger.borrow_mut().reconnects += 1;
        }
        first = false;
        loop {
            // Ctrl-C: the main thread gives up waiting and says stop.
            if *stop.borrow() {
                break;
            }
            // The next frame: the messages due now (open loop), or `batch` (closed loop).
            let n = if s.kind == Kind::Max {
                if epoch.elapsed().as_secs_f64() >= end_s {
                    break;
                }
                if let Some(w) = &window {
                    match w.acquire_many(s.batch).await {
                        Ok(permits) => permits.forget(),
                        Err(_) => break,
                    }
                }
                s.batch as usize
            } else {
                let Some(&(t, _)) = slots.get(next) else {
                    break;
                };
                tokio::time::sleep_until((epoch + Duration::from_secs_f64(t)).into()).await;
                let now = epoch.elapsed().as_secs_f64();
                slots[next..]
                    .iter()
                    .take(s.batch as usize)
                    .take_while(|(t, _)| *t <= now)
                    .count()
                    .max(1)
            };
            let (options, key, queues) = route(load, p, frames);
            frames += 1;
            let phase_now = |i: usize| slots.get(i).map_or(last, |(_, ph)| *ph);
            let mut messages = Vec::with_capacity(n);
            {
                let mut l = ledger.borrow_mut();
                for i in 0..n as u64 {
                    let h = Header {
                        producer: p,
                        seq: seq + i,
                        intended_ns: epoch.elapsed().as_nanos() as u64,
                        phase: phase_now(next + i as usize) as u16,
                        route: 0,
                    };
                    let mut body = vec![0xa5u8; rng.size(s.size).max(HEADER_LEN)];
                    h.write(&mut body);
                    messages.push(Message::new(Bytes::from(body)).persistent(true));
                    for q in &queues {
                        l.messages.insert((*q, p, seq + i), Seen::default());
                    }
                }
            }
            let first_seq = seq;
            seq += n as u64;
            if s.kind != Kind::Max {
                next += n;
            }
            match client.publish_batch_with(&options, &key, messages).await {
                Ok(futures) => {
                    let (ledger, window) = (ledger.clone(), window.clone());
                    confirmers.push(tokio::task::spawn_local(confirm(
                        p, first_seq, queues, futures, ledger, window,
                    )));
                }
                Err(e) => {
                    if let Some(w) = &window {
                        w.add_permits(n);
                    }
                    if matches!(e, ClientError::Closed(_)) {
                        continue 'connection;
                    }
                    ledger
                        .borrow_mut()
                        .fail(format!("producer {p}: publish: {e}"));
                }
            }
        }
        // Done: the confirms still owed come over this connection, which closes with `client`.
        for c in confirmers.drain(..) {
            let _ = c.await;
        }
        break;
    }
    // The connection died after the last publish: those confirms failed with it.
    for c in confirmers {
        let _ = c.await;
    }
}

async fn confirm(
    p: u32,
    first_seq: u64,
    queues: Vec<u16>,
    futures: Vec<PublishFuture>,
    ledger: Led,
    window: Option<Rc<Semaphore>>,
) {
    let n = futures.len();
    for (i, f) in futures.into_iter().enumerate() {
        match f.await {
            Ok(_) => {
                let mut l = ledger.borrow_mut();
                for q in &queues {
                    if let Some(m) = l.messages.get_mut(&(*q, p, first_seq + i as u64)) {
                        m.confirmed = true;
                    }
                }
            }
            Err(ClientError::Closed(_)) => {}
            Err(e) => ledger
                .borrow_mut()
                .fail(format!("producer {p}: confirm: {e}")),
        }
    }
    if let Some(w) = window {
        w.add_permits(n);
    }
}

/// Acks `held` (one frame, asking for the answer); the answer marks them acked.
fn ack(held: &mut Vec<(Key, Delivery)>, ledger: &Led) {
    if held.is_empty() {
        return;
    }
    let (keys, deliveries): (Vec<Key>, Vec<Delivery>) = std::mem::take(held).into_iter().unzip();
    let answer = Delivery::ack_all(&deliveries);
    let ledger = ledger.clone();
    tokio::task::spawn_local(async move {
        if answer.await.is_ok() {
            let mut l = ledger.borrow_mut();
            l.acks_answered += keys.len() as u64;
            for k in keys {
                if let Some(m) = l.messages.get_mut(&k) {
                    m.acked = true;
                }
            }
        }
    });
}

async fn consume(
    c: u32,
    load: &Load,
    epoch: Instant,
    ledger: &Led,
    mut addr: watch::Receiver<Option<String>>,
    mut stop: watch::Receiver<bool>,
) {
    let s = &load.scenario;
    let queue = c as usize % load.queue_names.len();
    let start = epoch + Duration::from_secs_f64(load.phase_starts[s.consumers_start_phase()]);
    tokio::select! {
        _ = tokio::time::sleep_until(start.into()) => {}
        _ = stop.changed() => return,
    }
    let interval = s.consumer_interval_s().map(Duration::from_secs_f64);
    let name = format!("weir-loadgen-chaos-consumer-{c}");
    let mut first = true;
    let mut next_at = Instant::now();
    while let Some(client) = connect(&name, &mut addr, &mut stop).await {
        if !first {
            ledger.borrow_mut().reconnects += 1;
        }
        first = false;
        let options = ConsumeOptions {
            prefetch: s.prefetch,
            ..ConsumeOptions::default()
        };
        let Ok(mut consumer) = client.consume(&load.queue_names[queue], options).await else {
            tokio::time::sleep(RECONNECT_EVERY).await;
            continue;
        };
        let mut held: Vec<(Key, Delivery)> = Vec::new();
        loop {
            let got = tokio::select! {
                d = consumer.recv() => d,
                _ = tokio::time::sleep(ACK_FLUSH), if !held.is_empty() => {
                    ack(&mut held, ledger);
                    continue;
                }
                _ = stop.changed() => {
                    let (_, deliveries): (Vec<Key>, Vec<Delivery>) = held.drain(..).unzip();
                    let _ = Delivery::ack_all(&deliveries).await;
                    return;
                }
            };
            let Some(Ok(d)) = got else { break };
            if let Some(iv) = interval {
                let now = Instant::now();
                if next_at > now {
                    tokio::time::sleep_until(next_at.into()).await;
                }
                next_at = next_at.max(now) + iv;
            }
            let Some(h) = Header::read(d.body()) else {
                ledger.borrow_mut().never_published += 1;
                continue;
            };
            let key = (queue as u16, h.producer, h.seq);
            {
                let mut l = ledger.borrow_mut();
                match l.messages.get_mut(&key) {
                    None => {
                        l.never_published += 1;
                        l.example(format!(
                            "never published: queue {queue} {}:{}",
                            h.producer, h.seq
                        ));
                        continue;
                    }
                    Some(m) => {
                        m.deliveries += 1;
                        let (again, acked) = (m.deliveries > 1, m.acked);
                        if acked {
                            l.resurrected += 1;
                            l.example(format!(
                                "resurrected: queue {queue} {}:{}",
                                h.producer, h.seq
                            ));
                        } else if again {
                            l.duplicated += 1;
                        }
                    }
                }
            }
            held.push((key, d));
            if held.len() >= s.ack_batch as usize {
                ack(&mut held, ledger);
            }
        }
        // The connection died: what was held comes back (redelivered), unacked.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(entries: &[(Key, Seen)]) -> Ledger {
        Ledger {
            messages: entries.iter().copied().collect(),
            ..Ledger::default()
        }
    }

    #[test]
    fn a_confirmed_message_never_delivered_is_lost_and_an_unconfirmed_one_is_not() {
        let seen = |confirmed, deliveries| Seen {
            confirmed,
            deliveries,
            acked: deliveries > 0,
        };
        let mut r = ChaosReport::default();
        finish(
            &mut r,
            ledger(&[
                ((0, 0, 0), seen(true, 1)),
                ((0, 0, 1), seen(true, 0)),
                ((0, 0, 2), seen(false, 0)),
                ((1, 0, 2), seen(false, 1)),
            ]),
        );
        assert_eq!((r.published, r.confirmed, r.unconfirmed), (4, 2, 2));
        assert_eq!((r.delivered, r.unconfirmed_delivered), (2, 1));
        assert_eq!(r.lost, 1);
        assert_eq!(r.examples, vec!["lost: queue 0 0:1".to_string()]);
        assert!(!r.promise_kept());
        r.lost = 0;
        assert!(r.promise_kept());
        r.resurrected = 1;
        assert!(
            !r.promise_kept(),
            "an answered ack undone breaks the promise"
        );
    }

    #[test]
    fn rpc_transient_queues_and_non_persistent_messages_are_refused() {
        let text = "[[phases]]\nname = \"a\"\nduration_s = 1\nrate = 1\n";
        let ok = crate::scenario::parse("t", text).expect("a scenario");
        assert!(check(&ok).is_ok());
        for (key, value) in [
            ("kind", "\"rpc\""),
            ("durable", "false"),
            ("persistent", "false"),
        ] {
            let s = crate::scenario::parse("t", &format!("{key} = {value}\n{text}"))
                .expect("a scenario");
            assert!(check(&s).is_err(), "{key} = {value} accepted");
        }
    }
}
