//! The seeded crash loop: the durability promise under random SIGKILLs, during load and during
//! recovery, checked against a model after every restart.
//!
//! Harsher than `client/tests/crash.rs`: two shards with mesh traffic both ways (queues owned by
//! each shard, published to from connections on the other shard, through the default, a direct
//! and a fanout exchange; consumers on both the owner's and the other shard's connection), bodies
//! from 16 B to `message_size_max` drawn log-uniformly, a cache budget of two messages so
//! almost everything is read back from the journal, 4 MiB segments so segments roll and are
//! reclaimed all the time, `fsync = always`, and acks of every kind: answered (awaited), sent and
//! never awaited, held and acked in groups, nacked back to the queue, and in flight when the
//! broker dies. Kill points: after a random number of load events (confirms and deliveries), during
//! start-up (before or just after the ready line, `Serve::start_and_kill_within`), and part way
//! through the drain that follows a restart (acks in flight).
//!
//! The model, per (queue, producer, sequence): published (the client was handed it: it may or
//! may not exist), confirmed (it must exist until acked), ack sent (it may be gone), gone for sure
//! (an ack was answered `Ok`, or a complete drain did not find it). After every restart each
//! queue is drained (every ready message consumed and acked with an answer); every delivery, in
//! the drain and during load, must be a message that was published, with exactly its bytes, and
//! not gone for sure; a complete drain must find every confirmed message whose ack was never sent.
//! Afterwards everything the drain did not find is gone for sure: a later appearance is a
//! resurrection.
//!
//! Seeded: `WEIR_CRASH_SEED` (else one from the clock, printed) fixes every choice (sizes,
//! batches, ack kinds, kill points); the interleaving of tasks and the broker is not fixed, so a
//! replay repeats the choices, not always the failure. `WEIR_CRASH_CYCLES` (default 10) sets the
//! number of load/kill/recover cycles; `tests/README.md` has the long-run command. A failure names
//! the seed and the cycle, and keeps the data directory.

mod common;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{queue_on, temp_dir, Broker};
use tokio::sync::{mpsc, Semaphore};
use weir_client::{
    Client, ClientError, ClientOptions, ConsumeOptions, Delivery, ExchangeKind, ExchangeOptions,
    Message, PublishFuture, PublishOptions, QueueOptions,
};

/// The broker's `message_size_max`: small enough to keep a cycle fast, large enough for
/// multi-block records and deliveries of one message per frame.
const MESSAGE_SIZE_MAX: u32 = 256 * 1024;
const FRAME_SIZE_MAX: u32 = 1024 * 1024;
/// Two largest messages: almost every queued message is cold and read back from the journal.
const CACHE_BYTES_MAX: u64 = 2 * (MESSAGE_SIZE_MAX as u64 + 64 * 1024);
const SEGMENT_SIZE_BYTES_MAX: u64 = 4 << 20;
/// Bodies from `BODY_MIN` to `BODY_MAX`: the most a message of `MESSAGE_SIZE_MAX` can carry
/// beside its (empty) properties.
const BODY_MIN: usize = 16;
const BODY_MAX: usize = MESSAGE_SIZE_MAX as usize - 256;
/// Unconfirmed messages a producer keeps in flight.
const IN_FLIGHT: usize = 24;
/// Load events (confirms plus deliveries) before the kill: drawn from this range.
const KILL_AFTER_EVENTS: (u64, u64) = (20, 240);
/// Longest wait for one step; a broker that stalls fails the test instead of hanging it.
const TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CYCLES: u64 = 10;

/// SplitMix64: a small deterministic generator, enough for choices and body bytes.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    /// A body size, log-uniform over `BODY_MIN..=BODY_MAX`, with both ends drawn now and then.
    fn body_size(&mut self) -> usize {
        match self.next() % 50 {
            0 => BODY_MIN,
            1 => BODY_MAX,
            _ => {
                let (lo, hi) = ((BODY_MIN as f64).ln(), (BODY_MAX as f64).ln());
                let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
                ((lo + u * (hi - lo)).exp() as usize).clamp(BODY_MIN, BODY_MAX)
            }
        }
    }
    /// A generator for a task, derived from this one.
    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

/// The body of `producer`'s message `seq`: `crsh`, the producer, the sequence, then bytes drawn
/// derived from both, so the checker can rebuild every byte.
fn body(producer: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(size);
    b.extend_from_slice(b"crsh");
    b.extend_from_slice(&producer.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    let start = Rng(u64::from(producer) << 40 ^ seq).next();
    b.resize(size.max(16), 0);
    // Word i is start ^ i (cheap in a debug build, and distinct per message and position).
    for (i, chunk) in b[16..].chunks_mut(8).enumerate() {
        let word = (start ^ i as u64).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    b
}

/// (queue index, producer, sequence).
type Key = (usize, u32, u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Not acked: present if confirmed, perhaps present otherwise.
    Open,
    /// An ack was sent and not answered (yet): perhaps gone.
    AckSent,
    /// The ack was answered `Ok`: it must never be delivered again.
    Acked,
    /// A complete drain after a restart did not find it: it must never appear.
    Absent,
}

#[derive(Debug)]
struct Entry {
    size: usize,
    confirmed: bool,
    fate: Fate,
}

/// What the test knows of every message ever handed to a client.
struct Model {
    seed: u64,
    cycle: u64,
    entries: HashMap<Key, Entry>,
    /// Broken promises, found by any task; the main loop fails the test with them.
    violations: Vec<String>,
    /// Load events (confirms, deliveries) in this cycle.
    events: u64,
    redelivered_after_ack_sent: u64,
}

type Shared = Arc<Mutex<Model>>;

fn lock(m: &Shared) -> std::sync::MutexGuard<'_, Model> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Model {
    fn violation(&mut self, what: String) {
        let line = format!("WEIR_CRASH_SEED={} cycle {}: {what}", self.seed, self.cycle);
        eprintln!("{line}");
        self.violations.push(line);
    }

    /// Checks one delivery from `queue`; its key when it is a message that may be there.
    fn check_delivery(&mut self, queue: usize, bytes: &[u8], during: &str) -> Option<Key> {
        if bytes.len() < 16 || &bytes[..4] != b"crsh" {
            self.violation(format!(
                "{during}: queue {queue} delivered a body that was never published ({} bytes, \
                 starting {:?})",
                bytes.len(),
                &bytes[..bytes.len().min(16)]
            ));
            return None;
        }
        let producer = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let key = (queue, producer, seq);
        let Some(e) = self.entries.get(&key) else {
            self.violation(format!(
                "{during}: queue {queue} delivered {producer}:{seq}, never published to it"
            ));
            return None;
        };
        let (size, fate) = (e.size, e.fate);
        if bytes.len() != size || bytes != body(producer, seq, size).as_slice() {
            self.violation(format!(
                "{during}: queue {queue} delivered {producer}:{seq} with other bytes ({} bytes, \
                 published {size})",
                bytes.len()
            ));
        }
        match fate {
            Fate::Acked => self.violation(format!(
                "{during}: queue {queue} delivered {producer}:{seq} again after its ack was answered"
            )),
            Fate::Absent => self.violation(format!(
                "{during}: queue {queue} delivered {producer}:{seq}, which a complete drain after \
                 an earlier restart did not find (resurrected)"
            )),
            Fate::AckSent => self.redelivered_after_ack_sent += 1,
            Fate::Open => {}
        }
        Some(key)
    }

    fn set_fate(&mut self, keys: &[Key], fate: Fate) {
        for k in keys {
            if let Some(e) = self.entries.get_mut(k) {
                // An answer is final; a later "ack sent" (of a redelivery) does not undo it.
                if e.fate != Fate::Acked && e.fate != Fate::Absent {
                    e.fate = fate;
                }
            }
        }
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

/// Where a producer publishes from and to.
#[derive(Clone, Copy)]
enum Route {
    /// The shard-aware client, the default exchange: `qa` on its owner's connection.
    LocalDefault,
    /// A connection on shard 1, the default exchange to `qa` (owned by shard 0): one mesh hop.
    MeshDefault,
    /// A connection on shard 0, the direct exchange with key `b` to `qb` (shard 1).
    MeshDirect,
    /// A connection on shard 1, the fanout exchange: `qa` (a hop) and `qb` (local).
    MeshFanout,
}

const ROUTES: [Route; 4] = [
    Route::LocalDefault,
    Route::MeshDefault,
    Route::MeshDirect,
    Route::MeshFanout,
];

struct Names {
    queues: [String; 2],
    fanout: String,
    direct: String,
}

impl Route {
    /// The queues (by index) a message lands on, the publish options and routing key.
    fn target(self, n: &Names) -> (Vec<usize>, PublishOptions, String) {
        let via = |exchange: &str| PublishOptions {
            exchange: exchange.to_string(),
            // A lost binding would drop the message: mandatory makes it come back, loudly.
            mandatory: true,
        };
        match self {
            Route::LocalDefault | Route::MeshDefault => {
                (vec![0], PublishOptions::default(), n.queues[0].clone())
            }
            Route::MeshDirect => (vec![1], via(&n.direct), "b".into()),
            Route::MeshFanout => (vec![0, 1], via(&n.fanout), String::new()),
        }
    }
}

/// The connections of one cycle.
struct Clients {
    aware: Client,
    on_shard: [Client; 2],
}

impl Clients {
    async fn connect(broker: &Broker) -> Clients {
        let on = |shard: usize| {
            let addr = SocketAddr::new(broker.listen.ip(), broker.shard_ports[shard]);
            async move {
                within(
                    "connect to a shard",
                    Client::connect(addr, ClientOptions::single_connection()),
                )
                .await
                .expect("connect to a shard's port")
            }
        };
        let aware = within(
            "connect",
            Client::connect(broker.listen, ClientOptions::default()),
        )
        .await
        .expect("connect");
        Clients {
            aware,
            on_shard: [on(0).await, on(1).await],
        }
    }

    fn for_route(&self, r: Route) -> Client {
        match r {
            Route::LocalDefault => self.aware.clone(),
            Route::MeshDefault | Route::MeshFanout => self.on_shard[1].clone(),
            Route::MeshDirect => self.on_shard[0].clone(),
        }
    }
}

fn closed_or_violation(model: &Shared, who: &str, e: &ClientError) {
    if !matches!(e, ClientError::Closed(_)) {
        lock(model).violation(format!(
            "{who}: failed with {e} rather than a closed connection"
        ));
    }
}

/// Publishes to `route` until the connection dies, up to `IN_FLIGHT` unconfirmed.
async fn produce(
    client: Client,
    producer: u32,
    route: Route,
    names: Arc<Names>,
    model: Shared,
    mut rng: Rng,
    events: mpsc::UnboundedSender<()>,
) {
    let (targets, options, key) = route.target(&names);
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    let (batches, mut pending) = mpsc::unbounded_channel::<(Vec<u64>, Vec<PublishFuture>)>();
    let collector = {
        let (window, model, targets) = (window.clone(), model.clone(), targets.clone());
        tokio::spawn(async move {
            while let Some((seqs, futures)) = pending.recv().await {
                let n = futures.len();
                for (seq, f) in seqs.into_iter().zip(futures) {
                    match f.await {
                        Ok(_) => {
                            let mut m = lock(&model);
                            for q in &targets {
                                if let Some(e) = m.entries.get_mut(&(*q, producer, seq)) {
                                    e.confirmed = true;
                                }
                            }
                            m.events += 1;
                            drop(m);
                            let _ = events.send(());
                        }
                        Err(e) => closed_or_violation(
                            &model,
                            &format!("producer {producer}'s confirm"),
                            &e,
                        ),
                    }
                }
                window.add_permits(n);
            }
        })
    };
    let mut seq = 0u64;
    loop {
        // A frame holds the batch: a few messages of up to `BODY_MAX`.
        let mut sizes = Vec::new();
        let mut frame = 256;
        for _ in 0..rng.range(1, 4) {
            let s = rng.body_size();
            if frame + s + 256 > FRAME_SIZE_MAX as usize {
                break;
            }
            frame += s + 256;
            sizes.push(s);
        }
        if sizes.is_empty() {
            sizes.push(BODY_MIN);
        }
        window
            .acquire_many(sizes.len() as u32)
            .await
            .expect("the window stays open")
            .forget();
        let seqs: Vec<u64> = (seq..seq + sizes.len() as u64).collect();
        seq += sizes.len() as u64;
        {
            // Recorded before sending: from here on the message may exist.
            let mut m = lock(&model);
            for (s, size) in seqs.iter().zip(&sizes) {
                for q in &targets {
                    m.entries.insert(
                        (*q, producer, *s),
                        Entry {
                            size: *size,
                            confirmed: false,
                            fate: Fate::Open,
                        },
                    );
                }
            }
        }
        let messages: Vec<Message> = seqs
            .iter()
            .zip(&sizes)
            .map(|(s, size)| Message::new(Bytes::from(body(producer, *s, *size))))
            .collect();
        match client.publish_batch_with(&options, &key, messages).await {
            Ok(futures) => {
                if batches.send((seqs, futures)).is_err() {
                    break;
                }
            }
            Err(e) => {
                closed_or_violation(&model, &format!("producer {producer}"), &e);
                break;
            }
        }
    }
    drop(batches);
    let _ = collector.await;
}

/// Sends an ack for `held` and records it: with `answered`, the answer is awaited by a task and
/// makes the messages gone for sure.
fn ack(model: &Shared, held: Vec<(Key, Delivery)>, answered: bool) {
    if held.is_empty() {
        return;
    }
    let (keys, deliveries): (Vec<Key>, Vec<Delivery>) = held.into_iter().unzip();
    lock(model).set_fate(&keys, Fate::AckSent);
    let answer = Delivery::ack_all(&deliveries);
    if answered {
        let model = model.clone();
        tokio::spawn(async move {
            if answer.await.is_ok() {
                lock(&model).set_fate(&keys, Fate::Acked);
            }
        });
    }
}

/// Consumes `queue` until the connection dies, settling each delivery in a random way.
async fn consume(
    client: Client,
    queue: usize,
    names: Arc<Names>,
    model: Shared,
    mut rng: Rng,
    events: mpsc::UnboundedSender<()>,
    who: String,
) {
    let options = ConsumeOptions {
        prefetch: rng.range(4, 64) as u32,
        ..ConsumeOptions::default()
    };
    let mut consumer = match client.consume(&names.queues[queue], options).await {
        Ok(c) => c,
        Err(e) => return closed_or_violation(&model, &who, &e),
    };
    let mut held: Vec<(Key, Delivery)> = Vec::new();
    let hold_max = rng.range(2, 16) as usize;
    loop {
        let d = match consumer.recv().await {
            Some(Ok(d)) => d,
            Some(Err(e)) => return closed_or_violation(&model, &who, &e),
            None => return,
        };
        let key = {
            let mut m = lock(&model);
            m.events += 1;
            m.check_delivery(queue, d.body(), &format!("{who} during load"))
        };
        let _ = events.send(());
        let Some(key) = key else { continue };
        match rng.next() % 100 {
            0..=34 => ack(&model, vec![(key, d)], true),
            35..=64 => ack(&model, vec![(key, d)], false),
            65..=89 => {
                held.push((key, d));
                if held.len() >= hold_max {
                    let answered = rng.chance(50);
                    ack(&model, std::mem::take(&mut held), answered);
                }
            }
            // Back to the queue: delivered again (to this consumer or another).
            _ => drop(d.nack(true)),
        }
    }
}

/// How a drain ended.
enum Drained {
    Complete,
    /// Stopped after some deliveries, with their ack sent but not answered: kill now.
    KillNow,
}

/// Consumes every ready message of `queue` and acks them with answers; with `stop_after`, sends
/// the last ack without waiting and stops there (the caller kills the broker).
async fn drain(
    client: &Client,
    queue: usize,
    names: &Names,
    model: &Shared,
    stop_after: Option<u64>,
) -> Drained {
    let name = &names.queues[queue];
    let info = within("queue info", client.queue_info(name))
        .await
        .unwrap_or_else(|e| panic!("{}: the durable queue {name} is gone: {e}", where_(model)));
    assert_eq!(
        info.messages_unacked,
        0,
        "{}: {name}: nothing can be unacked right after a restart",
        where_(model)
    );
    let mut consumer = within(
        "consume",
        client.consume(
            name,
            ConsumeOptions {
                prefetch: 256,
                ..ConsumeOptions::default()
            },
        ),
    )
    .await
    .expect("consume to drain");
    let mut seen: HashSet<Key> = HashSet::new();
    let mut batch: Vec<(Key, Delivery)> = Vec::new();
    for i in 0..info.messages_ready {
        if stop_after == Some(i) {
            ack(model, batch, false);
            return Drained::KillNow;
        }
        let d = within("a delivery while draining", consumer.recv())
            .await
            .expect("the consumer is open")
            .expect("a delivery");
        let key = {
            let mut m = lock(model);
            let key = m.check_delivery(queue, d.body(), "draining after a restart");
            if let Some(k) = key.filter(|k| !seen.insert(*k)) {
                m.violation(format!(
                    "draining {name}: {}:{} delivered twice in one drain",
                    k.1, k.2
                ));
            }
            key
        };
        if let Some(key) = key {
            batch.push((key, d));
        }
        if batch.len() >= 32 {
            settle_drained(model, std::mem::take(&mut batch)).await;
        }
    }
    settle_drained(model, batch).await;
    within("cancel", consumer.cancel()).await.expect("cancel");
    let after = within("queue info", client.queue_info(name))
        .await
        .expect("queue info");
    assert_eq!(
        (after.messages_ready, after.messages_unacked),
        (0, 0),
        "{}: {name}: everything ready was consumed and acked",
        where_(model)
    );
    // Every confirmed message whose ack was never sent must have been there.
    let mut m = lock(model);
    let mut lost: Vec<(u32, u64)> = m
        .entries
        .iter()
        .filter(|(k, e)| k.0 == queue && e.confirmed && e.fate == Fate::Open && !seen.contains(k))
        .map(|(k, _)| (k.1, k.2))
        .collect();
    lost.sort_unstable();
    if !lost.is_empty() {
        let first: Vec<_> = lost.iter().take(10).collect();
        m.violation(format!(
            "{name}: {} confirmed, never acked messages lost (first {first:?}); {} delivered in \
             the drain",
            lost.len(),
            seen.len()
        ));
    }
    // What the drain did not find is gone; anything left open now must never appear again.
    for (k, e) in m.entries.iter_mut() {
        if k.0 == queue && !seen.contains(k) && e.fate != Fate::Acked {
            e.fate = Fate::Absent;
        }
    }
    Drained::Complete
}

async fn settle_drained(model: &Shared, batch: Vec<(Key, Delivery)>) {
    if batch.is_empty() {
        return;
    }
    let (keys, deliveries): (Vec<Key>, Vec<Delivery>) = batch.into_iter().unzip();
    lock(model).set_fate(&keys, Fate::AckSent);
    match within("a drain ack", Delivery::ack_all(&deliveries)).await {
        Ok(()) => lock(model).set_fate(&keys, Fate::Acked),
        Err(e) => panic!("{}: an ack while draining failed: {e}", where_(model)),
    }
}

fn where_(model: &Shared) -> String {
    let m = lock(model);
    format!("WEIR_CRASH_SEED={} cycle {}", m.seed, m.cycle)
}

fn fail_on_violations(model: &Shared, data_dir: &Path) {
    let m = lock(model);
    if !m.violations.is_empty() {
        panic!(
            "{} broken promises (replay with WEIR_CRASH_SEED={}; data directory {}):\n{}",
            m.violations.len(),
            m.seed,
            data_dir.display(),
            m.violations.join("\n")
        );
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

struct Setup {
    config: String,
}

impl Setup {
    fn args(&self) -> Vec<&str> {
        vec![
            "--cpus",
            "0,1",
            "--fsync",
            "always",
            "--config",
            &self.config,
        ]
    }

    fn start(&self, dir: &Path) -> Broker {
        Broker::start(dir, &self.args())
    }

    /// SIGKILL during start-up: within `after` of the start, before or just after ready.
    fn start_and_kill(&self, dir: &Path, after: Duration) -> bool {
        weir_testkit::Serve::new(env!("CARGO_BIN_EXE_weir"))
            .data_dir(dir)
            .args(self.args())
            .start_and_kill_within(after)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

#[tokio::test]
async fn confirmed_messages_survive_random_sigkills_during_load_and_recovery() {
    let seed = env_u64("WEIR_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let cycles = env_u64("WEIR_CRASH_CYCLES").unwrap_or(DEFAULT_CYCLES);
    println!("crash loop: WEIR_CRASH_SEED={seed} WEIR_CRASH_CYCLES={cycles}");
    let mut rng = Rng(seed);
    let started = Instant::now();

    let config_dir = temp_dir("crash-loop-config");
    let config = config_dir.join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "[limits]\nframe_size_max = {FRAME_SIZE_MAX}\nmessage_size_max = {MESSAGE_SIZE_MAX}\n\
             cache_bytes_max = {CACHE_BYTES_MAX}\nsegment_size_bytes_max = {SEGMENT_SIZE_BYTES_MAX}\n"
        ),
    )
    .expect("write the configuration");
    let setup = Setup {
        config: config.to_str().expect("a UTF-8 path").to_string(),
    };
    let data_dir: PathBuf = temp_dir("crash-loop");
    let mut broker = setup.start(&data_dir);
    assert_eq!(broker.shard_ports.len(), 2, "two shards");
    let names = Arc::new(Names {
        queues: [
            queue_on(0, 2, "crash-loop-a"),
            queue_on(1, 2, "crash-loop-b"),
        ],
        fanout: "crash-loop-fanout".into(),
        direct: "crash-loop-direct".into(),
    });
    {
        let admin = Clients::connect(&broker).await.aware;
        for q in &names.queues {
            within("declare", admin.declare(q, QueueOptions::default()))
                .await
                .expect("declare a durable queue");
        }
        let durable = ExchangeOptions {
            durable: true,
            ..ExchangeOptions::default()
        };
        for (x, kind) in [
            (&names.fanout, ExchangeKind::Fanout),
            (&names.direct, ExchangeKind::Direct),
        ] {
            within(
                "declare an exchange",
                admin.declare_exchange(x, kind, durable),
            )
            .await
            .expect("declare a durable exchange");
        }
        for (i, q) in names.queues.iter().enumerate() {
            within("bind", admin.bind(q, &names.fanout, ""))
                .await
                .expect("bind");
            let key = ["a", "b"][i];
            within("bind", admin.bind(q, &names.direct, key))
                .await
                .expect("bind");
        }
    }

    let model: Shared = Arc::new(Mutex::new(Model {
        seed,
        cycle: 0,
        entries: HashMap::new(),
        violations: Vec::new(),
        events: 0,
        redelivered_after_ack_sent: 0,
    }));
    let mut kills = 0u64;
    for cycle in 0..cycles {
        {
            let mut m = lock(&model);
            m.cycle = cycle;
            m.events = 0;
        }
        // Load: four producers, four consumers, until the kill point.
        let clients = Clients::connect(&broker).await;
        let (events, mut progress) = mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (p, route) in ROUTES.iter().enumerate() {
            let producer = (cycle * ROUTES.len() as u64 + p as u64) as u32;
            tasks.push(tokio::spawn(produce(
                clients.for_route(*route),
                producer,
                *route,
                names.clone(),
                model.clone(),
                rng.fork(),
                events.clone(),
            )));
        }
        for (queue, client, who) in [
            (0, clients.aware.clone(), "qa's local consumer"),
            (0, clients.on_shard[1].clone(), "qa's consumer on shard 1"),
            (1, clients.aware.clone(), "qb's local consumer"),
            (1, clients.on_shard[0].clone(), "qb's consumer on shard 0"),
        ] {
            tasks.push(tokio::spawn(consume(
                client,
                queue,
                names.clone(),
                model.clone(),
                rng.fork(),
                events.clone(),
                who.to_string(),
            )));
        }
        drop(events);
        let kill_after = rng.range(KILL_AFTER_EVENTS.0, KILL_AFTER_EVENTS.1);
        let t_load = Instant::now();
        let mut seen = 0;
        within("load events before the kill", async {
            while seen < kill_after {
                progress.recv().await.expect("the load is running");
                seen += 1;
            }
        })
        .await;
        let dir = broker.crash();
        kills += 1;
        for t in tasks {
            within("a load task to stop", t).await.expect("load task");
        }
        drop(clients);
        fail_on_violations(&model, &dir);
        let load_time = t_load.elapsed();
        let t_recover = Instant::now();

        // Recovery, with kills while it runs.
        let mut recovery_kills = Vec::new();
        broker = loop {
            if recovery_kills.len() < 3 && rng.chance(40) {
                let after = Duration::from_millis(rng.range(0, 150));
                let was_ready = setup.start_and_kill(&dir, after);
                kills += 1;
                recovery_kills.push(if was_ready {
                    "just after ready".to_string()
                } else {
                    format!("{after:?} into start-up")
                });
                continue;
            }
            let b = setup.start(&dir);
            let client = Clients::connect(&b).await.aware;
            let mut complete = true;
            for queue in 0..2 {
                let stop_after =
                    (recovery_kills.len() < 3 && rng.chance(25)).then(|| rng.range(0, 300));
                if let Drained::KillNow = drain(&client, queue, &names, &model, stop_after).await {
                    complete = false;
                    break;
                }
            }
            drop(client);
            if complete {
                break b;
            }
            b.crash();
            kills += 1;
            recovery_kills.push("during the drain".to_string());
        };
        fail_on_violations(&model, &broker.data_dir);
        let m = lock(&model);
        println!(
            "cycle {cycle}: killed after {seen} load events ({load_time:?}); recovery kills: [{}]; \
             recovered and drained in {:?}; {} messages in the model; {:?} so far",
            recovery_kills.join(", "),
            t_recover.elapsed(),
            m.entries.len(),
            started.elapsed()
        );
    }
    let m = lock(&model);
    let confirmed = m.entries.values().filter(|e| e.confirmed).count();
    let bytes: usize = m.entries.values().map(|e| e.size).sum();
    println!(
        "{cycles} cycles, {kills} kills, {} messages published ({confirmed} confirmed, {} MiB), {} \
         redelivered after an unanswered ack; {:?}",
        m.entries.len(),
        bytes >> 20,
        m.redelivered_after_ack_sent,
        started.elapsed()
    );
    drop(m);
    let _ = std::fs::remove_dir_all(config_dir);
}
