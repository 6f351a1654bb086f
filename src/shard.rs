//! One shard: a pinned executor's accept loops, connections, queue host and mesh, its copy of
//! the routing table (and, on shard 0, the control-plane writer), its timers (expiry every
//! 100 ms, segment reclaim every 500 ms), dead-lettering, and its orderly shutdown.
//!
//! Contract: `run` is the future of one executor thread, pinned to one CPU. Everything it creates
//! (`ShardState`, its connections' sessions, its `QueueHost`) lives on that thread: `Rc`,
//! `RefCell`, `Cell`, no locks. Work arrives from this shard's connections (ops they route), and
//! from other shards over the mesh (requests for queues this shard owns, replies and pushes for
//! its connections); all of it goes through one work queue, drained in order, so that a reply
//! that causes a push that causes a requeue never re-enters a borrowed session.
//!
//! The only cross-thread inputs are the mesh and the stop flag set by the signal handler, which
//! the shard watches on its timer (shutdown is not on the data path: a 20 ms poll costs nothing
//! that matters and needs no cross-thread wake-up).
//!
//! Faults handled: accept errors (file descriptors exhausted, a reset before accept): logged,
//! then a short back-off, never a crash; connections over `connections_per_shard_max`: told why,
//! then closed; replies and pushes for connections that have gone: dropped (the owning shard
//! releases their deliveries when it learns of the close).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;

use crate::broker::catalog::CatalogRecord;
use crate::broker::host::{
    placement, Cache, ConnRef, DeadLetter, Liveness, MsgRef, QueueHost, Refusal, Stored,
};
use crate::broker::ops::{self, JournalSink, Op, Pushed, Reply};
use crate::broker::queue::Seq;
use crate::broker::rebuild::Rebuild;
use crate::broker::routing::RoutingChange;
use crate::control::{ControlOp, ControlPlane, RoutingCopy, CONTROL_CONN, CONTROL_SHARD};
use crate::limits::Limits;
use crate::mesh::{Batch, Mesh, MeshMsg};
use crate::net::connection;
use crate::net::session::{Routed, Session, SessionCtx};
use crate::rt;
use crate::rt::executor::{doorbell, Doorbell, DoorbellWaiter};
use crate::rt::fs::DmaDir;
use crate::rt::mesh::MeshEnds;
use crate::rt::net::{BoundListener, Listener};
use crate::storage::{
    Appended, Journal, JournalConfig, MessageEnvelope, SettleReason, SettleRecord, StorageError,
    Target,
};

/// How often a shard looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

/// How long a stopping shard waits for its connections to send what they owe. A peer that stops
/// reading must not hold the broker up forever; its connection is dropped after this.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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

/// A connection as the shard sees it: its session and the bytes owed to it.
pub struct ConnEntry {
    pub session: RefCell<Session>,
    pub outbox: RefCell<BytesMut>,
    pub bell: Doorbell,
}

/// The shard's state, shared by its tasks (all on this thread).
pub struct ShardState {
    pub id: u16,
    pub limits: Limits,
    session: SessionCtx,
    stopping: Cell<bool>,
    next_connection: Cell<u64>,
    connections: RefCell<HashMap<u64, Rc<ConnEntry>>>,
    /// Rung when a connection closes during shutdown.
    drained: Doorbell,
    host: RefCell<QueueHost>,
    journal: Journal<DmaDir>,
    /// The newest record appended while executing the current request.
    appended: Cell<Option<Appended>>,
    /// Messages the current request journaled.
    written: RefCell<Vec<(String, Seq, Seq)>>,
    mesh: Mesh,
    /// The host's live-messages-per-segment account (the same `Rc`), for reclaim.
    liveness: Rc<Liveness>,
    /// Replies waiting for their group commit; shutdown sends them before closing connections.
    replies_waiting: Cell<usize>,
    /// Rung when the worker has emptied the work queue or the last waiting reply went out:
    /// shutdown waits on it.
    idle: Doorbell,
    /// Work for the worker task, in arrival order.
    work: RefCell<VecDeque<MeshMsg>>,
    work_bell: Doorbell,
    /// This shard's copy of the routing table, shared with its sessions.
    routing: Rc<RoutingCopy>,
    /// Rung when the start-up copy of the routing table has arrived.
    routing_bell: Doorbell,
    /// The control-plane writer: on `CONTROL_SHARD` only.
    control: Option<RefCell<ControlPlane>>,
    /// Routing changes sent to every shard, by wait id: answered once all applied them.
    control_waits: RefCell<HashMap<u64, ControlWait>>,
    next_control_wait: Cell<u64>,
}

/// A client's routing change on its way: its answer goes once every shard's copy has applied it
/// and its records are durable.
struct ControlWait {
    copies_left: u16,
    durable: bool,
    to: ConnRef,
    id: u64,
    reply: Reply,
}

/// The shard's side of the journal for the queue host: records staged for the next group
/// commit, remembering the newest so the request's reply can wait for its commit.
struct Staging<'a> {
    journal: &'a Journal<DmaDir>,
    appended: &'a Cell<Option<Appended>>,
    /// Messages journaled by the current request, newest last: evicted after their commit if the
    /// shard is over its payload budget.
    written: &'a RefCell<Vec<(String, Seq, Seq)>>,
    liveness: &'a Rc<Liveness>,
}

impl Staging<'_> {
    fn note(&self, result: Result<Appended, StorageError>) -> Result<(), Refusal> {
        let a = result.map_err(storage_refusal)?;
        if self
            .appended
            .get()
            .is_none_or(|prev| prev.commit <= a.commit)
        {
            self.appended.set(Some(a));
        }
        Ok(())
    }
}

impl JournalSink for Staging<'_> {
    fn message(&mut self, targets: &[(&str, Seq)], msg: &Rc<Stored>) -> Result<(), Refusal> {
        let envelope = MessageEnvelope {
            exchange: msg.exchange.as_bytes(),
            routing_key: msg.routing_key.as_bytes(),
            targets: targets
                .iter()
                .map(|(queue, seq)| Target {
                    queue: queue.as_bytes(),
                    queue_seq: *seq,
                })
                .collect(),
        };
        let payload = msg.payload();
        let appended = self
            .journal
            .append_message(&envelope, &payload)
            .map_err(storage_refusal)?;
        msg.set_position(appended.position, appended.len, Some(self.liveness));
        // Runs of consecutive sequence numbers per queue: one name per run, not per message.
        let mut written = self.written.borrow_mut();
        for &(queue, seq) in targets {
            match written.last_mut() {
                Some((q, _, last)) if q == queue && *last + 1 == seq => *last = seq,
                _ => written.push((queue.to_string(), seq, seq)),
            }
        }
        drop(written);
        self.note(Ok(appended))
    }

    fn settle(
        &mut self,
        queue: &str,
        reason: SettleReason,
        ranges: &[(u64, u64)],
    ) -> Result<(), Refusal> {
        let record = SettleRecord {
            queue: queue.as_bytes(),
            reason,
            ranges: ranges.to_vec(),
        };
        self.note(self.journal.append_settle(&record))
    }

    fn catalog(&mut self, record: &CatalogRecord) -> Result<(), Refusal> {
        self.note(self.journal.append_control(&record.encode()))
    }
}

/// What a client is told when the journal cannot take or keep a record.
fn storage_refusal(e: StorageError) -> Refusal {
    let code = match e {
        StorageError::NoSpace(_) => weir_protocol::wire::ErrorCode::DiskFull,
        _ => weir_protocol::wire::ErrorCode::StorageFailed,
    };
    Refusal {
        code,
        message: format!("not stored: {e}"),
    }
}

/// Room to ask the journal for, per published message: its bytes, the record header and an
/// envelope (exchange, key, one target).
fn record_room(item: &ops::PublishItem) -> usize {
    let targets: usize = item.also.iter().map(|q| q.len() + 16).sum();
    item.bytes.len()
        + item.exchange.len()
        + item.routing_key.len()
        + item.queue.len()
        + targets
        + 64
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ShardState {
    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }

    pub fn connection_closed(&self, id: u64) {
        self.connections.borrow_mut().remove(&id);
        self.drained.ring();
    }

    /// Broker-unique: the shard in the top 16 bits, a counter below.
    fn next_connection_id(&self) -> u64 {
        let n = self.next_connection.get();
        self.next_connection.set(n + 1);
        (u64::from(self.id) << 48) | n
    }

    /// The journal sink for the request being executed.
    fn staging(&self) -> Staging<'_> {
        Staging {
            journal: &self.journal,
            appended: &self.appended,
            written: &self.written,
            liveness: &self.liveness,
        }
    }

    /// Sends a connection's ops to the shards that own their queues.
    pub fn route(&self, from: ConnRef, routed: Vec<Routed>) {
        for r in routed {
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
        self.work.borrow_mut().extend(batch);
        self.work_bell.ring();
    }

    fn send_to(&self, shard: u16, msg: MeshMsg) {
        if shard == self.id {
            self.work.borrow_mut().push_back(msg);
            self.work_bell.ring();
        } else {
            self.mesh.send(shard, msg);
        }
    }

    /// Executes a request on this shard's queues. Publishes go message by message, each after
    /// the journal has room for it: the byte bound of the group-commit window is what slows
    /// producers down, through the mesh and their connections, never a refusal.
    async fn execute(self: &Rc<Self>, from: ConnRef, id: u64, op: Op) {
        let op = match op {
            Op::Control(c) => return self.control(from, id, c),
            Op::Routing(change) => {
                self.apply_routing(change);
                let reply = Reply::Done;
                return self.reply_to(from, id, reply);
            }
            op => op,
        };
        let now = now_ms();
        let mut pushes = Vec::new();
        let reply = match op {
            Op::Publish(items) => {
                let mut outcomes = Vec::with_capacity(items.len());
                for item in items {
                    self.journal.wait_for_room(record_room(&item)).await;
                    let mut host = self.host.borrow_mut();
                    let mut sink = self.staging();
                    outcomes.push(ops::publish(&mut host, &mut sink, from, item, now));
                }
                Reply::Published(outcomes)
            }
            op => {
                let mut host = self.host.borrow_mut();
                let mut sink = self.staging();
                let mut reply = ops::execute(&mut host, &mut sink, from, op, now, &mut pushes);
                if let Reply::ShardStatus(st) = &mut reply {
                    let j = self.journal.stats();
                    st.connections = self.connections.borrow().len() as u64;
                    st.unroutable += self.routing.unroutable.get();
                    let table = self.routing.table.borrow();
                    st.exchanges = table.exchange_count() as u64;
                    st.bindings = table.binding_count() as u64;
                    st.cache_bytes_max = host.cache().max();
                    st.journal_commits = j.commits;
                    st.journal_records = j.records;
                    st.journal_bytes_written = j.bytes_written;
                    st.journal_fdatasyncs = j.fdatasyncs;
                    st.journal_segments = self
                        .journal
                        .segments()
                        .iter()
                        .filter(|s| !s.reclaimed)
                        .count() as u64;
                }
                reply
            }
        };
        {
            let mut host = self.host.borrow_mut();
            let mut sink = self.staging();
            if let Err(r) = ops::journal(&mut host, &mut sink) {
                tracing::error!(shard = self.id, "journal: {}", r.message);
            }
        }
        // Only the request's own records hold its reply back; what dispatching settles below
        // (auto-acks, expiries) is committed with the next group commit without anyone waiting.
        let own = self.appended.take();
        let written = std::mem::take(&mut *self.written.borrow_mut());
        {
            let mut host = self.host.borrow_mut();
            let mut sink = self.staging();
            ops::collect_pushes(
                &mut host,
                &mut sink,
                now,
                self.limits.wire.deliver_batch_max as usize,
                &mut pushes,
            );
            self.appended.set(None);
            self.written.borrow_mut().clear();
        }
        self.forget_removed_queues();
        let mut reply = Some(reply);
        if let Some(Reply::Got(Some(d), _)) = reply.as_mut() {
            if !self.fill(from, std::slice::from_mut(&mut **d)).await {
                reply = Some(Reply::Refused(Refusal {
                    code: weir_protocol::wire::ErrorCode::StorageFailed,
                    message: "the message could not be read back from the journal; it was requeued"
                        .into(),
                }));
            }
        }
        // A confirm (or a declare-ok) under fsync = always means on disk: the reply waits for the
        // group commit carrying this request's own records. Otherwise it goes now, before the
        // pushes, so a consumer's connection has its ConsumeOk before the deliveries after it.
        // (Under interval and never the records are staged; the committer makes them durable
        // with the next group commit, and the confirm says which policy it was given under.)
        let always = self.session.durability == weir_protocol::wire::Durability::Always;
        let mut held_reply = None;
        if always && own.is_some() {
            held_reply = reply.take();
        }
        if let Some(reply) = reply.take() {
            self.reply_to(from, id, reply);
        }
        // Payloads spilled to the journal are read back before their deliveries leave.
        for push in pushes.iter_mut() {
            if let Pushed::Deliver { to, deliveries, .. } = push {
                let to = *to;
                let mut kept = std::mem::take(deliveries);
                if !self.fill(to, &mut kept).await {
                    kept.retain(|d| d.fill.is_none());
                }
                *deliveries = kept;
            }
        }
        pushes
            .retain(|p| !matches!(p, Pushed::Deliver { deliveries, .. } if deliveries.is_empty()));
        let dead = self.host.borrow_mut().take_dead_letters();
        if !dead.is_empty() {
            self.dead_letter(dead).await;
        }
        // Deliveries go at once; a consumer may see a message before its publisher's confirm.
        for push in pushes {
            let to = match &push {
                Pushed::Deliver { to, .. } => *to,
                Pushed::Cancelled(c) => c.to,
            };
            self.send_to(
                to.shard,
                MeshMsg::Push {
                    from_shard: self.id,
                    push,
                },
            );
        }
        // Once the records are durable: evict their payloads if over budget, and send the reply
        // if it waited. Later requests go on meanwhile and join the next commit.
        let Some(appended) = own else { return };
        let waiting = held_reply.take();
        if waiting.is_some() {
            self.replies_waiting.set(self.replies_waiting.get() + 1);
        }
        let state = self.clone();
        rt::spawn_detached(async move {
            let result = state.journal.commit(&appended).await;
            if result.is_ok() {
                state.evict_if_over_budget(&written);
            }
            if let Some(reply) = waiting {
                let reply = match result {
                    Ok(()) => reply,
                    Err(e) => not_durable(reply, storage_refusal(e)),
                };
                state.reply_to(from, id, reply);
                state.replies_waiting.set(state.replies_waiting.get() - 1);
                if state.replies_waiting.get() == 0 {
                    state.idle.ring();
                }
            }
        });
    }

    /// The writer's side of a routing change: validate and apply it to the authoritative table,
    /// stage its records, send it to every shard's copy (in order: the mesh is FIFO per pair),
    /// and answer once every copy has it and, under `fsync = always`, its records are durable.
    /// Nothing here waits: the worker goes on with other work meanwhile.
    fn control(self: &Rc<Self>, from: ConnRef, id: u64, op: ControlOp) {
        let Some(writer) = &self.control else {
            let reply = Reply::Refused(Refusal {
                code: weir_protocol::wire::ErrorCode::Internal,
                message: format!("routing changes are made by shard {CONTROL_SHARD}"),
            });
            return self.reply_to(from, id, reply);
        };
        let applied = match writer.borrow_mut().execute(op) {
            Ok(applied) => applied,
            Err(e) => {
                let reply = Reply::Refused(Refusal {
                    code: e.code,
                    message: e.message,
                });
                return self.reply_to(from, id, reply);
            }
        };
        let mut reply = Reply::Done;
        let mut last = None;
        for record in &applied.records {
            match self.journal.append_control(&record.encode()) {
                Ok(a) => last = Some(a),
                Err(e) => {
                    // The change is live (every copy gets it, so they agree) but not durable.
                    reply = Reply::Refused(storage_refusal(e));
                    last = None;
                    break;
                }
            }
        }
        let wait = self.next_control_wait.get();
        self.next_control_wait.set(wait + 1);
        let shards = self.session.shard_count();
        let mut copies_left = 0;
        if let Some(change) = applied.change {
            copies_left = shards;
            for shard in 0..shards {
                self.request_of_own(shard, wait, Op::Routing(change.clone()));
            }
        }
        let always = self.session.durability == weir_protocol::wire::Durability::Always;
        let durable = last.is_none() || !always;
        self.control_waits.borrow_mut().insert(
            wait,
            ControlWait {
                copies_left,
                durable,
                to: from,
                id,
                reply,
            },
        );
        self.replies_waiting.set(self.replies_waiting.get() + 1);
        match last {
            Some(last) if !durable => {
                let state = self.clone();
                rt::spawn_detached(async move {
                    let result = state.journal.commit(&last).await;
                    if let Some(w) = state.control_waits.borrow_mut().get_mut(&wait) {
                        w.durable = true;
                        if let Err(e) = result {
                            w.reply = Reply::Refused(storage_refusal(e));
                        }
                    }
                    state.control_answer_if_done(wait);
                });
            }
            _ => self.control_answer_if_done(wait),
        }
    }

    /// A shard's copy has applied routing change `wait`.
    fn control_applied(&self, wait: u64) {
        if let Some(w) = self.control_waits.borrow_mut().get_mut(&wait) {
            w.copies_left -= 1;
        }
        self.control_answer_if_done(wait);
    }

    fn control_answer_if_done(&self, wait: u64) {
        let done = self
            .control_waits
            .borrow()
            .get(&wait)
            .is_some_and(|w| w.copies_left == 0 && w.durable);
        if !done {
            return;
        }
        let w = self
            .control_waits
            .borrow_mut()
            .remove(&wait)
            .expect("present");
        self.reply_to(w.to, w.id, w.reply);
        self.replies_waiting.set(self.replies_waiting.get() - 1);
        if self.replies_waiting.get() == 0 {
            self.idle.ring();
        }
    }

    /// Applies a change from the writer to this shard's copy. The start-up copy also opens the
    /// shard, and is checked against the queues this shard owns: a binding to one that is gone
    /// (deleted just before a crash, its unbind not yet durable) is removed through the writer.
    fn apply_routing(&self, change: RoutingChange) {
        let snapshot = matches!(change, RoutingChange::Snapshot(_));
        if let Err(e) = self.routing.table.borrow_mut().apply(change) {
            // The writer validated it against the same state: a copy that disagrees is a bug.
            tracing::error!(
                shard = self.id,
                "routing copy refused a change: {}",
                e.message
            );
            debug_assert!(false, "routing copy refused a change: {}", e.message);
        }
        if !snapshot {
            return;
        }
        let shards = self.session.shard_count();
        let mut gone: Vec<String> = {
            let host = self.host.borrow();
            self.routing
                .table
                .borrow()
                .bindings(None, None)
                .into_iter()
                .map(|b| b.queue)
                .filter(|q| placement(q, shards) == self.id && host.is_durable(q).is_none())
                .collect()
        };
        gone.dedup();
        for queue in gone {
            self.ask_control(ControlOp::QueueGone { queue });
        }
        self.routing.ready.set(true);
        self.routing_bell.ring();
    }

    /// Queues this shard removed take their bindings with them.
    fn forget_removed_queues(&self) {
        let removed = self.host.borrow_mut().take_removed();
        for queue in removed {
            if self.routing.table.borrow().has_bindings_to(&queue) {
                self.ask_control(ControlOp::QueueGone { queue });
            }
        }
    }

    /// Sends `reply` to request `id` of connection `to`, on whichever shard it lives.
    fn reply_to(&self, to: ConnRef, id: u64, reply: Reply) {
        self.send_to(to.shard, MeshMsg::Reply { to, id, reply });
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

    /// Publishes dead-lettered messages to their queues' dead-letter exchanges, routed by this
    /// shard's copy of the table, as this shard's own publishes (nobody waits for a confirm).
    /// The bytes are the message as its producer sent it (a cold one read back from its record):
    /// never re-encoded; its own expiration no longer applies. At most once: the original's
    /// settlement and the copy's acceptance are not one atomic step (as RabbitMQ's classic
    /// queues), and a copy that routes nowhere is dropped and counted as unroutable.
    async fn dead_letter(&self, letters: Vec<DeadLetter>) {
        let shards = self.session.shard_count();
        let max = self.limits.broker.targets_per_message_max as usize;
        let mut by_shard: HashMap<u16, Vec<ops::PublishItem>> = HashMap::new();
        for d in letters {
            let read = match &d.msg {
                MsgRef::Hot(s) => Some((s.payload(), s.routing_key.clone())),
                MsgRef::Cold {
                    position,
                    record_len,
                } => match self.journal.read(*position, Some(*record_len)).await {
                    Ok(record) => {
                        let (envelope, message) = MessageEnvelope::decode(record.body())
                            .unwrap_or_else(|e| {
                                panic!("journal record at {position:?} is not a message: {e}")
                            });
                        let key = String::from_utf8_lossy(envelope.routing_key).into_owned();
                        Some((bytes::Bytes::copy_from_slice(message), key))
                    }
                    Err(e) => {
                        tracing::error!(
                            shard = self.id,
                            queue = &*d.queue,
                            "dead-lettering: cannot read the message back: {e}"
                        );
                        None
                    }
                },
            };
            self.host.borrow().release_dead_letter(&d);
            let Some((bytes, original_key)) = read else {
                continue;
            };
            let key = d.routing_key.clone().unwrap_or(original_key);
            let mut queues: Vec<String> = if d.exchange.is_empty() {
                vec![key.clone()]
            } else {
                let table = self.routing.table.borrow();
                let mut matched = Vec::new();
                let _ = table.route(&d.exchange, &key, &mut matched);
                matched.into_iter().map(str::to_string).collect()
            };
            if queues.is_empty() {
                self.routing
                    .unroutable
                    .set(self.routing.unroutable.get() + 1);
                continue;
            }
            let item = ops::PublishItem {
                sequence: 0,
                queue: String::new(),
                also: Vec::new(),
                exchange: d.exchange.clone(),
                routing_key: key,
                mandatory: false,
                confirm: false,
                // Verified when it arrived; verified again here rather than read unchecked, as
                // dead letters are few.
                persistent: weir_protocol::verify_message(&bytes, &self.limits.wire)
                    .map_or(true, |m| m.persistent()),
                bytes,
                expiration_ms: None,
                deliver_at_ms: None,
            };
            for (shard, part) in ops::address(item, &mut queues, shards, max) {
                by_shard.entry(shard).or_default().push(part);
            }
        }
        for (shard, items) in by_shard {
            self.request_of_own(shard, 0, Op::Publish(items));
        }
    }

    /// Once their records are durable, the newest messages leave memory (payload, envelope and
    /// all: the queue keeps a cold reference to the record, no allocation) while journaled
    /// payloads hold more than their share of `cache_bytes_max`: the head of a backlog,
    /// delivered first, stays in memory; its tail waits on disk.
    fn evict_if_over_budget(&self, written: &[(String, Seq, Seq)]) {
        let mut host = self.host.borrow_mut();
        let cache = host.cache().clone();
        for (queue, first, last) in written.iter().rev() {
            for seq in (*first..=*last).rev() {
                if !cache.over_journaled_share() {
                    return;
                }
                host.cool(queue, seq);
            }
        }
    }

    /// Reads back the payloads of `deliveries` that are only in the journal. A payload that
    /// cannot be read is logged and its message requeued; returns false if any was.
    async fn fill(&self, to: ConnRef, deliveries: &mut [ops::WireDelivery]) -> bool {
        let mut all = true;
        for d in deliveries.iter_mut() {
            let Some((position, record_len)) = d.fill else {
                continue;
            };
            match self.journal.read(position, Some(record_len)).await {
                Ok(record) => {
                    let (envelope, message) = MessageEnvelope::decode(record.body())
                        .unwrap_or_else(|e| {
                            panic!("journal record at {position:?} is not a message: {e}")
                        });
                    // Checked before write (the entry was made from this record's position),
                    // checked after read: a record that does not name this message is a broken
                    // index, not a bad disk (its CRC passed).
                    assert!(
                        envelope
                            .targets
                            .iter()
                            .any(|t| t.queue == d.queue.as_bytes() && t.queue_seq == d.seq),
                        "journal record at {position:?} does not hold message {} of queue '{}'",
                        d.seq,
                        d.queue
                    );
                    d.exchange = String::from_utf8_lossy(envelope.exchange).into_owned();
                    d.routing_key = String::from_utf8_lossy(envelope.routing_key).into_owned();
                    d.bytes = bytes::Bytes::copy_from_slice(message);
                    d.fill = None;
                }
                Err(e) => {
                    tracing::error!(
                        shard = self.id,
                        queue = d.queue,
                        "cannot read a payload back: {e}"
                    );
                    all = false;
                    let requeued = self
                        .host
                        .borrow_mut()
                        .settle(to, &d.queue, d.owner, d.seq, false, true);
                    if let Err(r) = requeued {
                        tracing::error!(
                            shard = self.id,
                            "requeue after a failed read: {}",
                            r.message
                        );
                    }
                }
            }
        }
        all
    }

    fn deliver(&self, msg: MeshMsg) {
        match msg {
            MeshMsg::Request { .. } => unreachable!("requests are executed by the worker"),
            MeshMsg::Reply { to, id, .. } if to.conn == CONTROL_CONN => {
                if id != 0 {
                    self.control_applied(id);
                }
            }
            MeshMsg::Reply { to, id, reply } => {
                let Some(entry) = self.connections.borrow().get(&to.conn).cloned() else {
                    return;
                };
                let mut routed = Vec::new();
                entry.session.borrow_mut().on_reply(
                    id,
                    reply,
                    &mut entry.outbox.borrow_mut(),
                    &mut routed,
                );
                entry.bell.ring();
                self.route(to, routed);
            }
            MeshMsg::Push { from_shard, push } => {
                let to = match &push {
                    Pushed::Deliver { to, .. } => *to,
                    Pushed::Cancelled(c) => c.to,
                };
                let Some(entry) = self.connections.borrow().get(&to.conn).cloned() else {
                    return;
                };
                let mut routed = Vec::new();
                entry.session.borrow_mut().on_push(
                    from_shard,
                    push,
                    &mut entry.outbox.borrow_mut(),
                    &mut routed,
                );
                entry.bell.ring();
                for r in routed {
                    self.send_to(
                        r.shard,
                        MeshMsg::Request {
                            from: to,
                            id: r.id,
                            op: r.op,
                        },
                    );
                }
            }
        }
    }
}

/// A reply whose records did not become durable: every journaled publish in it is refused, and
/// any other answer becomes the refusal.
fn not_durable(reply: Reply, refusal: Refusal) -> Reply {
    match reply {
        Reply::Published(outcomes) => Reply::Published(
            outcomes
                .into_iter()
                .map(|mut o| {
                    if o.journaled {
                        o.journaled = false;
                        o.result = Err(refusal.clone());
                    }
                    o
                })
                .collect(),
        ),
        _ => Reply::Refused(refusal),
    }
}

/// How often a shard settles the expired heads of its queues (dead-lettering them where the
/// queue says so). A message's TTL is honoured to within this, also in a queue nobody consumes.
const EXPIRE_EVERY: Duration = Duration::from_millis(100);

/// Asks the worker, in its order, to expire what is due.
async fn expire_forever(state: Rc<ShardState>) {
    loop {
        rt::executor::sleep(EXPIRE_EVERY).await;
        if state.host.borrow().queue_count() == 0 {
            continue;
        }
        state.request_of_own(state.id, 0, Op::Expire);
    }
}

/// How often a shard looks for journal segments it can delete. Reclaim is housekeeping: a timer
/// costs nothing on the data path, and a second's delay only defers freeing disk space.
const RECLAIM_EVERY: Duration = Duration::from_millis(500);

/// Deletes journal segments from the oldest on, while the oldest holds no live message and is
/// not being appended to. Only a prefix of the log is ever deleted, so every settle record
/// deleted with it named a message deleted with it too. Before the first deletion of a round,
/// every durable queue's declaration and next sequence number are written again and committed:
/// the segments going away may hold the only copies. (One old unacked message pins every later
/// segment: moving it forward, `Journal::relocate`, is not done yet.)
async fn reclaim_forever(state: Rc<ShardState>) {
    loop {
        rt::executor::sleep(RECLAIM_EVERY).await;
        let mut restated = false;
        loop {
            let segments = state.journal.segments();
            let Some(oldest) = segments.iter().find(|s| !s.reclaimed) else {
                break;
            };
            if oldest.active || state.liveness.live_in(oldest.number) > 0 {
                break;
            }
            if !restated {
                let mut records = state.host.borrow().restatement();
                if let Some(writer) = &state.control {
                    records.extend(writer.borrow().restatement());
                }
                let mut last = None;
                for record in &records {
                    match state.journal.append_control(&record.encode()) {
                        Ok(a) => last = Some(a),
                        Err(e) => {
                            tracing::warn!(
                                shard = state.id,
                                "reclaim: cannot restate the catalog: {e}"
                            );
                            break;
                        }
                    }
                }
                if let Some(last) = last {
                    if let Err(e) = state.journal.commit(&last).await {
                        tracing::warn!(
                            shard = state.id,
                            "reclaim: restated catalog not durable: {e}"
                        );
                        break;
                    }
                }
                restated = true;
                continue; // the restatement may have rolled a segment: look again
            }
            match state.journal.reclaim(oldest.number).await {
                Ok(()) => tracing::debug!(shard = state.id, segment = oldest.number, "reclaimed"),
                Err(e) => {
                    tracing::warn!(shard = state.id, segment = oldest.number, "reclaim: {e}");
                    break;
                }
            }
        }
    }
}

/// The worker: executes requests for this shard's queues and hands replies and pushes to its
/// connections, in arrival order. One task, so a request never runs inside another.
async fn work_forever(state: Rc<ShardState>, bell: DoorbellWaiter) {
    loop {
        loop {
            let Some(msg) = state.work.borrow_mut().pop_front() else {
                break;
            };
            match msg {
                MeshMsg::Request { from, id, op } => state.execute(from, id, op).await,
                other => state.deliver(other),
            }
        }
        state.idle.ring();
        if !bell.wait().await {
            return;
        }
    }
}

/// Runs a shard until the stop flag is set and its connections have closed.
pub async fn run(setup: ShardSetup) {
    let (senders, receivers) = setup.mesh.connect().await;
    let (mesh, flush_waiter) = Mesh::new(senders);
    let (drained, drained_waiter) = doorbell();
    let (work_bell, work_waiter) = doorbell();
    let (idle, idle_waiter) = doorbell();

    // Recover before serving: the journal's replay rebuilds the queues this shard owns.
    let mut rebuild = Rebuild::new();
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
    let (journal, host, line) = match opened {
        Ok((journal, report)) => match rebuild.finish(
            setup.id,
            Cache::new(setup.limits.broker.cache_bytes_max),
            now_ms(),
        ) {
            Ok((host, summary)) => {
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
        connections: RefCell::new(HashMap::new()),
        drained,
        host: RefCell::new(host),
        journal,
        appended: Cell::new(None),
        written: RefCell::new(Vec::new()),
        replies_waiting: Cell::new(0),
        idle,
        liveness: host_liveness,
        mesh,
        work: RefCell::new(VecDeque::new()),
        work_bell,
        routing: Rc::new(RoutingCopy::default()),
        routing_bell,
        control,
        control_waits: RefCell::new(HashMap::new()),
        next_control_wait: Cell::new(1),
    });
    let mut tasks = Vec::new();
    tasks.push(rt::spawn(work_forever(state.clone(), work_waiter)));
    tasks.push(rt::spawn(reclaim_forever(state.clone())));
    tasks.push(rt::spawn(expire_forever(state.clone())));
    let flusher = state.clone();
    tasks.push(rt::spawn(async move {
        flusher.mesh.flush_forever(flush_waiter).await
    }));
    for receiver in receivers.into_iter().flatten() {
        let s = state.clone();
        tasks.push(rt::spawn(crate::mesh::receive_forever(
            receiver,
            move |batch| s.receive(batch),
        )));
    }
    // Every shard serves only once it holds the writer's copy of the routing table, so a
    // durable binding routes from the first publish after a restart.
    if let Some(writer) = &state.control {
        let table = writer.borrow().table().clone();
        for shard in 0..state.session.shard_count() {
            let op = Op::Routing(RoutingChange::Snapshot(table.snapshot()));
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
        .map(|bound| rt::spawn(accept_loop(Listener::from_bound(bound), state.clone())))
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
        while state.replies_waiting.get() > 0 || !state.work.borrow().is_empty() {
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

async fn accept_loop(listener: Listener, state: Rc<ShardState>) {
    loop {
        let conn = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                tracing::warn!(shard = state.id, "accept failed: {e}");
                rt::executor::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if state.is_stopping() {
            continue;
        }
        let id = state.next_connection_id();
        let ctx = SessionCtx {
            connection_id: id,
            ..state.session.clone()
        };
        let mut session = Session::new(ctx, state.routing.clone());
        let max = state.limits.broker.connections_per_shard_max;
        if state.connections.borrow().len() >= max as usize {
            rt::spawn_detached(async move {
                let mut conn = conn;
                let mut out = BytesMut::new();
                session.refuse_over_limit(&mut out, max);
                let _ = conn.write_all(&out).await;
                let _ = conn.close().await;
            });
            continue;
        }
        tracing::debug!(shard = state.id, connection = id, peer = ?conn.peer_addr().ok(), "accepted");
        let (bell, waiter) = doorbell();
        let entry = Rc::new(ConnEntry {
            session: RefCell::new(session),
            outbox: RefCell::new(BytesMut::new()),
            bell,
        });
        state.connections.borrow_mut().insert(id, entry.clone());
        rt::spawn_detached(connection::serve(conn, entry, waiter, state.clone(), id));
    }
}
