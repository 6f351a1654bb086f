//! One shard: a pinned executor's accept loops, connections, queue host and mesh, its copy of
//! the routing table (and, on shard 0, the control-plane writer), its timers, dead-lettering,
//! and its orderly shutdown. The shell only drives: every decision it carries out is a pure
//! state machine under `broker` (dead letters, read-back, cooling, control waits, held
//! replies, orphan bindings, reclaim), fed the clock as `now_ms`.
//!
//! Contract: `run` is the future of one executor thread, pinned to one CPU. Everything it creates
//! (`ShardState`, its connections' sessions, its `QueueHost`) lives on that thread: `Rc`,
//! `RefCell`, `Cell`, no locks (`ShardState` is `!Send`, asserted below). Work arrives from this
//! shard's connections (ops they address to it), and from other shards over the mesh (requests for
//! queues this shard owns, replies and pushes for its connections); all of it goes through one
//! work queue, drained in order, so that a reply that causes a push that causes a requeue never
//! re-enters a borrowed session. The work queue and the outgoing mesh queues are bounded in bytes
//! (`work_bytes_max`, `mesh_outgoing_bytes_max`): past either, the mesh receivers stop taking
//! batches (so the peers' flushers wait on full channels) and the shard's connections stop
//! reading, until the worker or the flusher has made room. The worker itself never waits for
//! room (its replies and pushes always queue), so draining never depends on a peer draining.
//!
//! The only cross-thread inputs are the mesh and the stop flag set by the signal handler, which
//! the shard watches on its timer (shutdown is not on the data path: a 20 ms poll costs nothing
//! that matters and needs no cross-thread wake-up).
//!
//! - `run`: start-up (recovery, the routing table's first copy), serving, ordered shutdown.
//! - `accept`: accept loops and the per-shard connection limit.
//! - `worker`: the one task that executes requests and hands out replies and pushes.
//! - `staging`: the journal as the queue host's sink (records staged for the group commit).
//! - `read_back`: payloads read back from the journal for deliveries (by a task of their own,
//!   so the worker never waits for a delivery's read) and dead letters.
//! - `control`: the control-plane writer's side of a change, and this shard's routing copy.
//! - `housekeeping`: the expiry and segment-reclaim timers.
//! - `observe`: the shard's own part of `Status` and its page of the connection listing.
//!
//! Faults handled: accept errors (file descriptors exhausted, a reset before accept): logged,
//! then a short back-off, never a crash; connections over `connections_per_shard_max`: told why,
//! then closed; replies and pushes for connections that have gone: dropped (the owning shard
//! releases their deliveries when it learns of the close).

mod accept;
mod confirmer;
mod control;
mod housekeeping;
mod observe;
mod read_back;
mod run;
mod staging;
mod worker;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::broker::control::{ControlPlane, RoutingCopy, CONTROL_CONN, CONTROL_SHARD};
use crate::broker::control_wait::ControlWaits;
use crate::broker::cooling::Written;
use crate::broker::durability::HeldReplies;
use crate::broker::host::QueueHost;
use crate::broker::producers::ProducerTable;
use crate::broker::routing::hash::FastMap;
use crate::broker::stored::Liveness;
use crate::limits::Limits;
use crate::mesh::msg::ControlOp;
use crate::mesh::msg::{Op, Reply};
use crate::mesh::types::ConnRef;
use crate::mesh::{Batch, Mesh, MeshMsg};
use crate::net::connection::{ConnEntry, ConnectionHost};
use crate::net::session::{Addressed, SessionCtx, Tally};
use crate::rt::executor::Doorbell;
use crate::rt::fs::DmaDir;
use crate::rt::mesh::MeshEnds;
use crate::rt::net::BoundListener;
use crate::storage::{Appended, Journal};

pub use run::run;

/// What a shard is started with (built on the main thread, moved to the shard's thread).
pub struct ShardSetup {
    pub id: u16,
    /// The shared main listener and this shard's own port.
    pub listeners: Vec<BoundListener>,
    pub session: SessionCtx,
    pub limits: Limits,
    pub mesh: MeshEnds<Batch>,
    /// This shard's journal directory (`<data_dir>/shard-<id>`), which must exist.
    pub journal_dir: PathBuf,
    /// Told once the shard has recovered its journal (a one-line summary) or why it cannot.
    pub recovered: std::sync::mpsc::Sender<Result<String, String>>,
    /// Set by SIGTERM/SIGINT.
    pub stop: Arc<AtomicBool>,
}

/// The shard's state, shared by its tasks (all on this thread).
pub struct ShardState {
    pub id: u16,
    pub limits: Limits,
    session: SessionCtx,
    stopping: Cell<bool>,
    next_connection: Cell<u64>,
    connections: RefCell<FastMap<u64, Rc<ConnEntry>>>,
    /// Rung when a connection closes during shutdown.
    drained: Doorbell,
    host: RefCell<QueueHost>,
    /// Idempotent producers' windows for the messages this shard stores.
    producers: RefCell<ProducerTable>,
    journal: Journal<DmaDir>,
    /// The newest record appended while executing the current request.
    appended: Cell<Option<Appended>>,
    /// Messages the current request journaled.
    written: RefCell<Written>,
    mesh: Mesh,
    /// The host's live-messages-per-segment account (the same `Rc`), for reclaim.
    liveness: Rc<Liveness>,
    /// Replies waiting for their group commit; shutdown sends them before closing connections.
    held: RefCell<HeldReplies>,
    /// Requests whose records are staged, in commit order, for the confirmer.
    awaiting: RefCell<confirmer::Awaiting>,
    /// Rung when a request joins `awaiting`.
    confirm_bell: Doorbell,
    /// Rung when the worker has emptied the work queue or the last waiting reply went out:
    /// shutdown waits on it.
    idle: Doorbell,
    /// Work for the worker task, in arrival order, each with its `mesh::weight`.
    work: RefCell<VecDeque<(usize, MeshMsg)>>,
    /// The sum of the weights in `work`: over `work_bytes_max`, the shard takes no more.
    work_bytes: Cell<usize>,
    work_bell: Doorbell,
    /// Connections that stopped reading because the shard had no room (`has_room`), rung when
    /// it has again.
    parked: RefCell<Vec<u64>>,
    /// Mesh receivers waiting for room, rung with the parked connections.
    room_waiters: RefCell<Vec<Doorbell>>,
    /// This shard's copy of the routing table, shared with its sessions.
    routing: Rc<RoutingCopy>,
    /// Rung when the start-up copy of the routing table has arrived.
    routing_bell: Doorbell,
    /// The control-plane writer: on `CONTROL_SHARD` only.
    control: Option<RefCell<ControlPlane>>,
    /// Routing changes sent to every shard, answered once all applied them.
    control_waits: RefCell<ControlWaits>,
    /// Dead letters whose originals are settled once their copies are confirmed.
    dead_letter_waits: RefCell<crate::broker::dead_letter::DeadLetterWaits>,
    /// Pushes waiting for the read-back task (their cold payloads), in order.
    read_backs: read_back::ReadBackFifo,
    /// When the due timer wakes next, ms since the epoch (`u64::MAX`: nothing due), and its
    /// bell, rung when an earlier due time is noted (`housekeeping::promote_when_due`).
    due_next: Cell<u64>,
    due_bell: Doorbell,
    /// What this shard's sessions count (confirms, limits hit), for `Status`.
    tally: Rc<Tally>,
}

// The per-core boundary as a type fact: a `ShardState` never leaves its thread.
assert_not_send!(ShardState);

/// The clock, read by the shell only: the decisions it drives are given `now_ms`.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ConnectionHost for ShardState {
    fn submit(&self, from: ConnRef, outbound: Vec<Addressed>) {
        self.send_addressed(from, outbound);
    }

    fn is_stopping(&self) -> bool {
        self.is_stopping()
    }

    fn connection_closed(&self, id: u64) {
        self.connection_closed(id);
    }

    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn has_room(&self) -> bool {
        self.has_room()
    }

    fn park(&self, id: u64) {
        let mut parked = self.parked.borrow_mut();
        if !parked.contains(&id) {
            parked.push(id); // once: a parked connection may wake for other reasons and park again
        }
    }
}

impl ShardState {
    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }

    pub fn connection_closed(&self, id: u64) {
        self.connections.borrow_mut().remove(&id);
        self.drained.ring();
    }

    /// Sends a connection's ops to the shards that own their queues.
    pub fn send_addressed(&self, from: ConnRef, outbound: Vec<Addressed>) {
        for r in outbound {
            self.send_to(
                r.shard,
                MeshMsg::Request {
                    from,
                    id: r.id,
                    op: r.op,
                },
            );
        }
    }

    /// Hands a batch from a peer to the worker.
    fn receive(&self, batch: Batch) {
        for msg in batch {
            self.push_work(msg);
        }
    }

    fn push_work(&self, msg: MeshMsg) {
        let weight = crate::mesh::weight(&msg);
        self.work_bytes.set(self.work_bytes.get() + weight);
        self.work.borrow_mut().push_back((weight, msg));
        self.work_bell.ring();
    }

    /// The worker's next piece of work, if any; taking it may make room for more.
    fn next_work(&self) -> Option<MeshMsg> {
        let (weight, msg) = self.work.borrow_mut().pop_front()?;
        self.work_bytes.set(self.work_bytes.get() - weight);
        self.room_made();
        Some(msg)
    }

    /// Whether the shard takes more input from its connections and peers: its work queue and
    /// its outgoing mesh queues are within `work_bytes_max` and `mesh_outgoing_bytes_max`. Each
    /// intake is checked before it is taken, so a bound is exceeded by at most what one intake
    /// brings (a batch, or one read's frames of each connection).
    fn has_room(&self) -> bool {
        let b = &self.limits.broker;
        (self.work_bytes.get() as u64) <= b.work_bytes_max
            && (self.mesh.outgoing_bytes() as u64) <= b.mesh_outgoing_bytes_max
    }

    /// Work or outgoing bytes went down: if that made room, wake whoever waits for it.
    fn room_made(&self) {
        if self.parked.borrow().is_empty() && self.room_waiters.borrow().is_empty() {
            return;
        }
        if !self.has_room() {
            return;
        }
        let parked = std::mem::take(&mut *self.parked.borrow_mut());
        {
            let connections = self.connections.borrow();
            for id in parked {
                if let Some(entry) = connections.get(&id) {
                    entry.bell.ring();
                }
            }
        }
        for bell in std::mem::take(&mut *self.room_waiters.borrow_mut()) {
            bell.ring();
        }
    }

    /// Waits until the shard has room for more work (a mesh receiver, between batches).
    async fn room(&self) {
        while !self.has_room() {
            let (bell, waiter) = crate::rt::executor::doorbell();
            self.room_waiters.borrow_mut().push(bell);
            waiter.wait().await;
        }
    }

    fn send_to(&self, shard: u16, msg: MeshMsg) {
        if shard == self.id {
            self.push_work(msg);
        } else {
            self.mesh.send(shard, msg);
        }
    }

    /// Sends `reply` to request `id` of connection `to`, on whichever shard it lives.
    fn reply_to(&self, to: ConnRef, id: u64, reply: Reply) {
        self.send_to(to.shard, MeshMsg::Reply { to, id, reply });
    }

    /// A held reply went out: the last one lets shutdown go on.
    fn release_held(&self) {
        if self.held.borrow_mut().release() {
            self.idle.ring();
        }
    }

    /// A routing change of the shard's own (no client waits for it).
    fn ask_control(&self, op: ControlOp) {
        self.request_of_own(CONTROL_SHARD, 0, Op::Control(op));
    }

    /// A request the shard itself makes (a routing change, its own publish, its expiry tick):
    /// from `CONTROL_CONN`, so its reply is an acknowledgement (`id` names a control wait) or,
    /// with `id` 0, nothing anyone waits for.
    fn request_of_own(&self, to: u16, id: u64, op: Op) {
        let from = ConnRef {
            shard: self.id,
            conn: CONTROL_CONN,
        };
        self.send_to(to, MeshMsg::Request { from, id, op });
    }
}
