//! The coordinator: the main thread's part of a run, from the admin connection to the outcome.
//!
//! Contract: runs on the main thread (a current-thread runtime built by `run`). It owns the
//! admin `Client`, the load threads' join handles and the start/stop signals; it shares with
//! the threads only `Shared` (the scenario and a few relaxed counters). Every thread connects
//! and subscribes before the epoch is fixed; the epoch is one `Instant`, so every intended time
//! and latency is on one clock. At the end it joins the threads and merges their recorders.
//!
//! Faults handled: a broker that cannot be reached, a message size beyond the broker's limit,
//! a load thread that fails or panics during setup (the run is abandoned before it starts,
//! everything declared is cleaned up), a load thread that fails or panics during the run (its
//! error is the run's, after cleanup).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use weir_client::{Client, ClientOptions};

use super::sampling::{watch, Watched};
use super::setup::{cleanup, declare};
use super::threads::load_thread;
use super::{BrokerFacts, Outcome, Role, RunConfig, Shared};
use crate::stats::Recorder;

pub(super) async fn coordinate(cfg: &RunConfig, abort: Arc<AtomicBool>) -> Result<Outcome, String> {
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

    let Watched {
        samples,
        drained_at_s,
        aborted,
        end_s,
    } = watch(
        &admin,
        &shared,
        epoch,
        publishing_end_s,
        consumers_start_s,
        cfg.progress,
    )
    .await;
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
