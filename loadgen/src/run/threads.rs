//! One load thread: its runtime, its connections, and the tasks of its roles.
//!
//! Contract: one OS thread per entry of `RunConfig::thread_cpus`, pinned to its CPU when one is
//! given, with its own tokio current-thread runtime, its own `Client` connections (one per role)
//! and its own `Recorder` (shared by its tasks through an `Rc`, never across threads). It
//! connects every role (and subscribes the consumers that start with the first phase), says it
//! is ready, waits for the epoch, runs its tasks to the end and hands its recorder back.
//!
//! Faults handled: a runtime that cannot start, a role that cannot connect or subscribe (the
//! thread reports the error instead of ready, naming itself, and ends), the coordinator giving
//! up during setup (the thread ends with an empty recorder), a task that panics (its error is
//! the thread's).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use weir_client::{Client, ClientOptions, ConsumeOptions, Consumer, Requester};

use super::consumers::consume;
use super::producers::{closed_loop_producer, producer, requests};
use super::{Role, Shared};
use crate::scenario::Kind;
use crate::stats::Recorder;

/// A thread's recorder, shared by its tasks.
pub(super) type Rec = Rc<RefCell<Recorder>>;

enum Prepared {
    Producer(u32, Client),
    Requester(u32, Client, Requester),
    Consumer(u32, Client, Option<Consumer>),
}

pub(super) fn load_thread(
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

pub(super) async fn subscribe(client: &Client, sh: &Shared, id: u32) -> Result<Consumer, String> {
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
