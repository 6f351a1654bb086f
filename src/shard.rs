//! One shard: a pinned executor's accept loops, its connections, and its orderly shutdown.
//!
//! Contract: `run` is the future of one executor thread, pinned to one CPU. Everything it creates
//! (`ShardState`, connections, later its queues and journal) lives on that thread: `Rc`,
//! `RefCell`, `Cell`, no locks. The only cross-thread input is the stop flag set by the signal
//! handler, which the shard watches on its timer (shutdown is not on the data path, so a 20 ms
//! poll costs nothing that matters and needs no cross-thread wake-up machinery).
//!
//! Faults handled: accept errors (file descriptors exhausted, a connection reset before accept):
//! logged, then a short back-off, never a crash; connections over `connections_per_shard_max`:
//! told why, then closed.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use crate::limits::Limits;
use crate::net::connection;
use crate::net::session::{Session, SessionCtx};
use crate::rt;
use crate::rt::executor::{doorbell, Doorbell, DoorbellWaiter};
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
    /// Every open connection's doorbell, by connection id.
    connections: RefCell<HashMap<u64, Doorbell>>,
    /// Rung when a connection closes during shutdown.
    drained: Doorbell,
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
}

/// Runs a shard until the stop flag is set and its connections have closed.
pub async fn run(setup: ShardSetup) {
    let (drained, drained_waiter) = doorbell();
    let state = Rc::new(ShardState {
        id: setup.id,
        limits: setup.limits,
        session: setup.session,
        stopping: Cell::new(false),
        next_connection: Cell::new(1),
        connections: RefCell::new(HashMap::new()),
        drained,
    });
    let accepts: Vec<_> = setup
        .listeners
        .into_iter()
        .map(|bound| rt::spawn(accept_loop(Listener::from_bound(bound), state.clone())))
        .collect();
    tracing::info!(shard = state.id, "serving");

    while !setup.stop.load(Ordering::Relaxed) {
        rt::executor::sleep(STOP_POLL).await;
    }
    tracing::info!(
        shard = state.id,
        "stopping: no new connections; closing open ones"
    );
    state.stopping.set(true);
    drop(accepts); // dropping a task cancels it: the listeners close
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
}

/// Rings every connection so it tells its peer and closes, then waits until all have.
async fn shutdown_connections(state: &ShardState, drained: &DoorbellWaiter) {
    for bell in state.connections.borrow().values() {
        bell.ring();
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
        state.connections.borrow_mut().insert(id, bell);
        rt::spawn_detached(connection::serve(conn, session, waiter, state.clone(), id));
    }
}
