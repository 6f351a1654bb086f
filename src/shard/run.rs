//! A shard's life: recovery before serving, the routing table's first copy, serving, and the
//! ordered shutdown.
//!
//! Contract: `run` is the future of one executor thread; it builds the `ShardState` every other
//! task of the shard shares and owns those tasks (dropping them cancels them). Faults handled: a
//! journal that cannot be recovered, or a stop before the routing table arrived (told to the
//! main thread through `recovered`, and the shard ends without serving); connections that will
//! not drain at shutdown (dropped after `SHUTDOWN_GRACE`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::broker::control::{ControlPlane, RoutingCopy, CONTROL_SHARD};
use crate::broker::control_wait::ControlWaits;
use crate::broker::cooling::Written;
use crate::broker::durability::HeldReplies;
use crate::broker::host::HostLimits;
use crate::broker::producers::ProducerLimits;
use crate::broker::rebuild::Rebuild;
use crate::broker::routing::hash::FastMap;
use crate::broker::stored::Cache;
use crate::mesh::msg::Op;
use crate::mesh::msg::RoutingChange;
use crate::mesh::Mesh;
use crate::rt;
use crate::rt::executor::{doorbell, DoorbellWaiter};
use crate::rt::fs::DmaDir;
use crate::rt::net::Listener;
use crate::storage::{Journal, JournalConfig};

use super::{accept, confirmer, housekeeping, now_ms, worker, ShardSetup, ShardState};

/// How often a shard looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

/// How long a stopping shard waits for its connections to send what they owe. A peer that stops
/// reading must not hold the broker up forever; its connection is dropped after this.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs a shard until the stop flag is set and its connections have closed.
pub async fn run(setup: ShardSetup) {
    let (senders, receivers) = setup.mesh.connect().await;
    let (mesh, flush_waiter) = Mesh::new(senders, setup.limits.broker.mesh_batch_max as usize);
    let (drained, drained_waiter) = doorbell();
    let (work_bell, work_waiter) = doorbell();
    let (idle, idle_waiter) = doorbell();
    let (confirm_bell, confirm_waiter) = doorbell();
    let (due_bell, due_waiter) = doorbell();

    // Recover before serving: the journal's replay rebuilds the queues this shard owns.
    let mut rebuild = Rebuild::with_producer_window(setup.limits.broker.producer_window_max);
    let config = JournalConfig {
        shard_id: u32::from(setup.id),
        limits: setup.limits.storage,
    };
    let opened = Journal::open(
        DmaDir::new(&setup.journal_dir),
        config,
        |position, kind, body| rebuild.apply(position, kind, body),
    )
    .await;
    let routing_table = rebuild.take_routing();
    let mut producers = rebuild.take_producers(now_ms());
    producers.set_limits(ProducerLimits {
        window: setup.limits.broker.producer_window_max,
        producers_max: setup.limits.broker.producers_per_shard_max as usize,
        idle_expiry_ms: setup.limits.broker.producer_idle_expiry_ms,
    });
    let (journal, mut host, line) = match opened {
        Ok((journal, report)) => match rebuild.finish(
            setup.id,
            Cache::new(setup.limits.payload_cache_bytes()),
            now_ms(),
        ) {
            Ok((mut host, summary)) => {
                host.set_limits(HostLimits {
                    queues_per_shard_max: setup.limits.broker.queues_per_shard_max,
                    queued_messages_max: setup.limits.broker.queued_messages_max,
                });
                let cut = report
                    .cut
                    .map(|c| format!(", cut a torn tail: {c:?}"))
                    .unwrap_or_default();
                let line = format!(
                    "shard {}: journal {} segments, {} records; {} durable queues, {} messages{cut}",
                    setup.id, report.segments, summary.records, summary.queues, summary.messages
                );
                (journal, host, line)
            }
            Err(e) => {
                let _ = setup.recovered.send(Err(format!(
                    "shard {}: journal {}: {e}",
                    setup.id,
                    setup.journal_dir.display()
                )));
                return;
            }
        },
        Err(e) => {
            let _ = setup
                .recovered
                .send(Err(format!("shard {}: {e}", setup.id)));
            return;
        }
    };
    rt::spawn_detached(journal.clone().run_committer());
    journal.set_read_ahead_bytes_max(setup.limits.read_ahead_bytes());
    let (read_backs, read_back_waiter) = super::read_back::ReadBackFifo::new();
    host.set_outbox_bytes_max(setup.limits.broker.outbox_bytes_max);
    let host_liveness = host.liveness().clone();
    let (routing_bell, routing_waiter) = doorbell();
    let control = (setup.id == CONTROL_SHARD).then(|| {
        let summary = format!(
            "; control plane: {} durable exchanges, {} durable bindings",
            routing_table.exchange_count(),
            routing_table.binding_count()
        );
        let (exchanges_max, bindings_max) = (
            setup.limits.broker.exchanges_max,
            setup.limits.broker.bindings_max,
        );
        let writer = ControlPlane::new(routing_table, exchanges_max, bindings_max);
        (RefCell::new(writer), summary)
    });
    let (control, line) = match control {
        Some((writer, summary)) => (Some(writer), line + &summary),
        None => (None, line),
    };
    let state = Rc::new(ShardState {
        id: setup.id,
        limits: setup.limits,
        session: setup.session,
        stopping: Cell::new(false),
        next_connection: Cell::new(1),
        connections: RefCell::new(FastMap::default()),
        drained,
        host: RefCell::new(host),
        producers: RefCell::new(producers),
        journal,
        appended: Cell::new(None),
        written: RefCell::new(Written::default()),
        held: RefCell::new(HeldReplies::default()),
        awaiting: RefCell::new(Default::default()),
        confirm_bell,
        idle,
        liveness: host_liveness,
        mesh,
        work: RefCell::new(VecDeque::new()),
        work_bytes: Cell::new(0),
        work_bell,
        parked: RefCell::new(Vec::new()),
        room_waiters: RefCell::new(Vec::new()),
        routing: Rc::new(RoutingCopy::default()),
        routing_bell,
        control,
        control_waits: RefCell::new(ControlWaits::default()),
        dead_letter_waits: RefCell::new(Default::default()),
        read_backs,
        due_next: Cell::new(u64::MAX),
        due_bell,
        tally: Rc::default(),
    });
    let mut tasks = vec![
        rt::spawn(worker::work_forever(state.clone(), work_waiter)),
        rt::spawn(confirmer::confirm_forever(state.clone(), confirm_waiter)),
        rt::spawn(housekeeping::reclaim_forever(state.clone())),
        rt::spawn(housekeeping::expire_forever(state.clone())),
        rt::spawn(housekeeping::promote_when_due(state.clone(), due_waiter)),
    ];
    let flusher = state.clone();
    tasks.push(rt::spawn(async move {
        let sent = || flusher.room_made();
        flusher.mesh.flush_forever(flush_waiter, sent).await
    }));
    for receiver in receivers.into_iter().flatten() {
        let (s, r) = (state.clone(), state.clone());
        tasks.push(rt::spawn(async move {
            let room = || r.room();
            crate::mesh::receive_forever(receiver, move |batch| s.receive(batch), room).await
        }));
    }
    tasks.push(rt::spawn(super::read_back::read_back_forever(
        state.clone(),
        read_back_waiter,
    )));
    // Every shard serves only once it holds the writer's copy of the routing table, so a
    // durable binding routes from the first publish after a restart.
    if let Some(writer) = &state.control {
        let snapshot = writer.borrow().table().snapshot();
        for shard in 0..state.session.shard_count() {
            let op = Op::Routing(RoutingChange::Snapshot(snapshot.clone()));
            state.request_of_own(shard, 0, op);
        }
    }
    while !state.routing.ready.get() {
        if setup.stop.load(Ordering::Relaxed) {
            let _ = setup.recovered.send(Err(format!(
                "shard {}: stopped before the control plane's routing table arrived",
                state.id
            )));
            return;
        }
        let ready = async {
            routing_waiter.wait().await;
        };
        futures_lite::future::or(ready, rt::executor::sleep(STOP_POLL)).await;
    }
    let _ = setup.recovered.send(Ok(line));
    let accepts: Vec<_> = setup
        .listeners
        .into_iter()
        .map(|bound| {
            rt::spawn(accept::accept_loop(
                Listener::from_bound(bound),
                state.clone(),
            ))
        })
        .collect();
    tracing::info!(shard = state.id, "serving");

    while !setup.stop.load(Ordering::Relaxed) {
        rt::executor::sleep(STOP_POLL).await;
    }
    // Orderly: no new connections; every staged record committed; every reply that waited for
    // its commit handed to its connection; then connections are told, send what they owe, and
    // close.
    tracing::info!(
        shard = state.id,
        "stopping: no new connections; finishing commits"
    );
    drop(accepts);
    let finish = async {
        state.journal.close().await;
        while !state.held.borrow().is_empty() || !state.work.borrow().is_empty() {
            idle_waiter.wait().await;
        }
    };
    let grace = async {
        rt::executor::sleep(SHUTDOWN_GRACE).await;
    };
    futures_lite::future::or(finish, grace).await;
    tracing::info!(shard = state.id, "closing connections");
    state.stopping.set(true);
    let drained = async {
        shutdown_connections(&state, &drained_waiter).await;
        true
    };
    let grace = async {
        rt::executor::sleep(SHUTDOWN_GRACE).await;
        false
    };
    if futures_lite::future::or(drained, grace).await {
        tracing::info!(shard = state.id, "stopped");
    } else {
        let left = state.connections.borrow().len();
        tracing::warn!(
            shard = state.id,
            left,
            "stopped; connections that would not drain were dropped"
        );
    }
    drop(tasks); // dropping a task cancels it: the worker and the mesh ends stop
}

/// Rings every connection so it tells its peer and closes, then waits until all have.
async fn shutdown_connections(state: &ShardState, drained: &DoorbellWaiter) {
    for entry in state.connections.borrow().values() {
        entry.bell.ring();
    }
    while !state.connections.borrow().is_empty() {
        drained.wait().await;
    }
}
