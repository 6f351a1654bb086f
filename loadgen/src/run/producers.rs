//! Producers: the open-loop schedule, open- and closed-loop producers, and rpc requesters.
//!
//! Contract: tasks on a load thread's runtime, one per producer role, each with its own
//! `Client`. An open-loop producer sends each message at its intended time from the schedule
//! (at once if late, the messages already due together, up to `batch` per frame); its latencies
//! count from the intended time, so a stall that delays sending is in the numbers. A
//! closed-loop producer (`max`) keeps `in_flight` messages unconfirmed. With `idiom =
//! "per-message"` every message is its own `publish_with` call (as applications publish), its
//! confirm future kept and awaited by the confirmer; with `"batch"` a frame's messages go in one
//! `publish_batch_with` call. Confirms are awaited in
//! publish order by a companion task that records latencies and the loss ledger. A requester
//! sends each request at its intended time, each awaited by its own task.
//!
//! Faults handled: publish refusals and failed requests are counted as failures (the first
//! one's text kept); a dead connection stops the producer; the abort flag stops it at once.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};
use weir_client::{Client, ClientError, Message, PublishFuture, PublishOptions, Requester};

use super::threads::Rec;
use super::Shared;
use crate::scenario::{Idiom, Kind, Scenario, Size, HEADER_LEN};
use crate::stats::{Count, Header, Metric};

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
    /// Producer `p`'s own sequence, the same on every run.
    fn for_producer(p: u32) -> Rng {
        Rng(0x9e37_79b9_7f4a_7c15 ^ (u64::from(p) + 1))
    }

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

    /// A message carrying `h`, its size drawn from the scenario's, persistent as it says.
    fn message(&mut self, s: &Scenario, h: &Header) -> Message {
        Message::new(body(h, self.size(s.size))).persistent(s.persistent)
    }
}

fn body(h: &Header, len: usize) -> Bytes {
    let mut b = vec![0xa5u8; len.max(HEADER_LEN)];
    h.write(&mut b);
    Bytes::from(b)
}

pub(super) fn now_ns(epoch: Instant) -> u64 {
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

/// One producer's sending side: its route, its frame count, and where its confirms go.
struct Outbox<'a> {
    p: u32,
    client: &'a Client,
    route: Route,
    frames: u64,
    confirms: mpsc::UnboundedSender<Pending>,
    sh: &'a Shared,
    rec: &'a Rec,
}

impl<'a> Outbox<'a> {
    /// Producer `p`'s outbox, and the receiving end its confirmer takes.
    fn open(
        p: u32,
        client: &'a Client,
        sh: &'a Shared,
        rec: &'a Rec,
    ) -> (Outbox<'a>, mpsc::UnboundedReceiver<Pending>) {
        let (confirms, rx) = mpsc::unbounded_channel();
        let outbox = Outbox {
            p,
            client,
            route: Route::new(sh, p),
            frames: 0,
            confirms,
            sh,
            rec,
        };
        (outbox, rx)
    }

    /// The route index of the next frame, written into its messages' headers.
    fn next_route(&self) -> u16 {
        (self.frames % self.route.keys.len() as u64) as u16
    }

    /// Makes this producer's next message for the frame being filled: its header (sequence,
    /// intended send time, phase, route) in the body, and what the confirmer needs of it.
    fn stage(
        &self,
        rng: &mut Rng,
        seq: &mut u64,
        intended_ns: u64,
        phase: usize,
        messages: &mut Vec<Message>,
        meta: &mut Vec<(u64, u64, usize)>,
    ) {
        let h = Header {
            producer: self.p,
            seq: *seq,
            intended_ns,
            phase: phase as u16,
            route: self.next_route(),
        };
        messages.push(rng.message(&self.sh.scenario, &h));
        meta.push((*seq, intended_ns, phase));
        *seq += 1;
    }

    /// Publishes one frame and hands its confirms to the confirmer; `sent_ns` is when it counts
    /// as sent (`None`: when the publish returns). A refusal is recorded once per message and
    /// returned, so the caller can stop on a dead connection.
    async fn send(
        &mut self,
        messages: Vec<Message>,
        meta: Vec<(u64, u64, usize)>,
        sent_ns: Option<u64>,
        epoch: Instant,
    ) -> Result<(), ClientError> {
        let n = meta.len() as u64;
        let (key, queues) = self.route.frame(self.frames);
        self.frames += 1;
        let published = match self.sh.scenario.idiom {
            Idiom::Batch => {
                self.client
                    .publish_batch_with(&self.route.options, key, messages)
                    .await
            }
            // As an application publishes: one call per message, its confirm future kept. The
            // scenario check holds `batch` at 1 for this idiom, so a frame is one message and a
            // failure below is that message's (never a part of a frame after some were sent).
            Idiom::PerMessage => {
                let mut futures = Vec::with_capacity(messages.len());
                let mut failed = None;
                for m in messages {
                    match self.client.publish_with(&self.route.options, key, m).await {
                        Ok(f) => futures.push(f),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    None => Ok(futures),
                    Some(e) => Err(e),
                }
            }
        };
        match published {
            Ok(futures) => {
                let now = sent_ns.unwrap_or_else(|| now_ns(epoch));
                self.rec.borrow_mut().count(Count::Sent, now, n);
                self.sh.sent.fetch_add(n, Ordering::Relaxed);
                let _ = self.confirms.send((queues, meta, futures));
                Ok(())
            }
            Err(e) => {
                let mut r = self.rec.borrow_mut();
                for _ in 0..n {
                    r.failed(&format!("producer {}: publish: {e}", self.p));
                }
                Err(e)
            }
        }
    }
}

/// The open-loop producer: every message at its intended time (or at once when late), the
/// messages due together in one frame of at most `batch`.
pub(super) async fn producer(p: u32, client: Client, sh: &Shared, epoch: Instant, rec: &Rec) {
    let s = &sh.scenario;
    let (mut outbox, rx) = Outbox::open(p, &client, sh, rec);
    let confirms = confirmer(p, rx, sh, epoch, rec, None);
    let sending = async {
        let mut rng = Rng::for_producer(p);
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
                        let phase = slot.phase;
                        outbox.stage(
                            &mut rng,
                            &mut seq,
                            intended,
                            phase,
                            &mut messages,
                            &mut meta,
                        );
                        slots.next();
                    }
                    _ => break,
                }
            }
            if let Err(ClientError::Closed(_)) = outbox.send(messages, meta, None, epoch).await {
                break;
            }
        }
        drop(outbox);
    };
    tokio::join!(sending, confirms);
    let _ = client.close().await;
}

/// The closed-loop producer (`max`): a window of `in_flight` unconfirmed messages, refilled in
/// batches as confirms return, until the last phase ends. Latency counts from the actual send.
pub(super) async fn closed_loop_producer(
    p: u32,
    client: Client,
    sh: &Shared,
    epoch: Instant,
    rec: &Rec,
) {
    let s = &sh.scenario;
    let window = Rc::new(Semaphore::new(s.in_flight as usize));
    let (mut outbox, rx) = Outbox::open(p, &client, sh, rec);
    let confirms = confirmer(p, rx, sh, epoch, rec, Some(window.clone()));
    let end = epoch + Duration::from_secs_f64(sh.total_s());
    let sending = async {
        let mut rng = Rng::for_producer(p);
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
                outbox.stage(&mut rng, &mut seq, now, phase, &mut messages, &mut meta);
            }
            let n = meta.len();
            if let Err(e) = outbox.send(messages, meta, Some(now), epoch).await {
                window.add_permits(n);
                if matches!(e, ClientError::Closed(_)) {
                    break;
                }
            }
        }
        drop(outbox);
    };
    tokio::join!(sending, confirms);
    let _ = client.close().await;
}

/// The rpc requester: each request at its intended time, each its own task, so that a slow
/// reply never delays the next request (open loop).
pub(super) async fn requests(
    p: u32,
    requester: Requester,
    sh: Arc<Shared>,
    epoch: Instant,
    rec: Rec,
) {
    let s = &sh.scenario;
    let queue = sh.queue_names[0].clone();
    let mut rng = Rng::for_producer(p);
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
        let message = rng.message(s, &h);
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
