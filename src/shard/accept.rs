//! Accepting connections: the accept loops of one shard (the shared main port and its own).
//!
//! Contract: one task per listener on the shard's thread; each accepted connection becomes a
//! `ConnEntry` the shard holds and a task of its own (`net::connection::serve`). Faults handled:
//! accept errors (file descriptors exhausted, a reset before accept): logged, then a short
//! back-off, never a crash; connections over `connections_per_shard_max`: told why, then closed;
//! connections arriving while the shard stops: closed unanswered.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;

use crate::mesh::types::ConnRef;
use crate::net::connection::{self, ConnEntry};
use crate::net::session::{Session, SessionCtx};
use crate::rt;
use crate::rt::executor::doorbell;
use crate::rt::net::Listener;

use super::ShardState;

impl ShardState {
    /// Broker-unique: the shard in the top 16 bits, a counter below.
    fn next_connection_id(&self) -> u64 {
        let n = self.next_connection.get();
        self.next_connection.set(n + 1);
        (u64::from(self.id) << 48) | n
    }
}

/// Debug builds only: `WEIR_TEST_PANIC_SHARD=N` makes shard N panic when it accepts a
/// connection, so a black-box test can watch a shard's panic end the process (fail-stop,
/// `tests/serve.rs`). Release builds have no such door.
#[cfg(debug_assertions)]
fn test_panic_requested(shard: u16) -> bool {
    std::env::var("WEIR_TEST_PANIC_SHARD").is_ok_and(|v| v.parse() == Ok(shard))
}

pub(super) async fn accept_loop(listener: Listener, state: Rc<ShardState>) {
    #[cfg(debug_assertions)]
    let panic_on_accept = test_panic_requested(state.id);
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
        #[cfg(debug_assertions)]
        if panic_on_accept {
            panic!(
                "shard {} panics on purpose (WEIR_TEST_PANIC_SHARD)",
                state.id
            );
        }
        let id = state.next_connection_id();
        let ctx = SessionCtx {
            connection_id: id,
            accepted_ms: super::now_ms(),
            ..state.session.clone()
        };
        let mut session = Session::new(ctx, state.routing.clone());
        session.count_into(state.tally.clone());
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
        let peer = conn
            .peer_addr()
            .map_or_else(|_| String::new(), |a| a.to_string());
        tracing::debug!(shard = state.id, connection = id, peer = %peer, "accepted");
        let (bell, waiter) = doorbell();
        let entry = Rc::new(ConnEntry {
            session: RefCell::new(session),
            outbox: RefCell::new(BytesMut::new()),
            bell,
            peer,
            bytes_received: Cell::new(0),
            bytes_sent: Cell::new(0),
        });
        state.connections.borrow_mut().insert(id, entry.clone());
        let me = ConnRef {
            shard: state.id,
            conn: id,
        };
        let wire = state.limits.wire;
        rt::spawn_detached(connection::serve(
            conn,
            entry,
            waiter,
            state.clone(),
            me,
            wire,
        ));
    }
}
