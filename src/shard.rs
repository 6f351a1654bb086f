//! One shard: a pinned executor's accept loops, connections, queue host and mesh, and its orderly
//! shutdown.
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
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;

use crate::broker::host::{ConnRef, QueueHost};
use crate::broker::ops::{self, Pushed};
use crate::limits::Limits;
use crate::mesh::{Batch, Mesh, MeshMsg};
use crate::net::connection;
use crate::net::session::{Routed, Session, SessionCtx};
use crate::rt;
use crate::rt::executor::{doorbell, Doorbell, DoorbellWaiter};
use crate::rt::mesh::MeshEnds;
use crate::rt::net::{BoundListener, Listener};

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
    mesh: Mesh,
    work: RefCell<VecDeque<MeshMsg>>,
    draining: Cell<bool>,
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
        self.drain();
    }

    /// Hands a batch from a peer to the work queue.
    fn receive(&self, batch: Batch) {
        self.work.borrow_mut().extend(batch);
        self.drain();
    }

    fn send_to(&self, shard: u16, msg: MeshMsg) {
        if shard == self.id {
            self.work.borrow_mut().push_back(msg);
        } else {
            self.mesh.send(shard, msg);
        }
    }

    /// Processes queued work until none is left. Re-entrant calls return at once: the outer
    /// call picks up what they queued.
    fn drain(&self) {
        if self.draining.replace(true) {
            return;
        }
        loop {
            let Some(msg) = self.work.borrow_mut().pop_front() else {
                break;
            };
            self.handle(msg);
        }
        self.draining.set(false);
    }

    fn handle(&self, msg: MeshMsg) {
        match msg {
            MeshMsg::Request { from, id, op } => {
                let now = now_ms();
                let mut pushes = Vec::new();
                let reply = {
                    let mut host = self.host.borrow_mut();
                    let reply = ops::execute(&mut host, from, op, now, &mut pushes);
                    ops::collect_pushes(
                        &mut host,
                        now,
                        self.limits.wire.deliver_batch_max as usize,
                        &mut pushes,
                    );
                    reply
                };
                // The reply goes first: a consumer's connection learns its consumer id before
                // the deliveries that name it.
                self.send_to(
                    from.shard,
                    MeshMsg::Reply {
                        to: from,
                        id,
                        reply,
                    },
                );
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
            }
            MeshMsg::Reply { to, id, reply } => {
                let Some(entry) = self.connections.borrow().get(&to.conn).cloned() else {
                    return;
                };
                entry
                    .session
                    .borrow_mut()
                    .on_reply(id, reply, &mut entry.outbox.borrow_mut());
                entry.bell.ring();
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

/// Runs a shard until the stop flag is set and its connections have closed.
pub async fn run(setup: ShardSetup) {
    let (senders, receivers) = setup.mesh.connect().await;
    let (mesh, flush_waiter) = Mesh::new(senders);
    let (drained, drained_waiter) = doorbell();
    let state = Rc::new(ShardState {
        id: setup.id,
        limits: setup.limits,
        session: setup.session,
        stopping: Cell::new(false),
        next_connection: Cell::new(1),
        connections: RefCell::new(HashMap::new()),
        drained,
        host: RefCell::new(QueueHost::new(setup.id)),
        mesh,
        work: RefCell::new(VecDeque::new()),
        draining: Cell::new(false),
    });
    let mut tasks = Vec::new();
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
    for bound in setup.listeners {
        tasks.push(rt::spawn(accept_loop(
            Listener::from_bound(bound),
            state.clone(),
        )));
    }
    tracing::info!(shard = state.id, "serving");

    while !setup.stop.load(Ordering::Relaxed) {
        rt::executor::sleep(STOP_POLL).await;
    }
    tracing::info!(
        shard = state.id,
        "stopping: no new connections; closing open ones"
    );
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
    drop(tasks); // dropping a task cancels it: listeners and mesh ends close
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
        let mut session = Session::new(ctx);
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
