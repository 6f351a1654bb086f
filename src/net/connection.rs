//! The I/O shell of one connection: read, decode, answer, send, write, on the shard that
//! accepted it.
//!
//! Contract: one task per connection on its shard's executor; it owns the socket and the receive
//! buffer (frames are sliced out of it without copying; an idle connection holds none, see
//! `rt::net::Connection::read_buf`). The session and the outbox live in a
//! `ConnEntry` the shard also holds, because replies and deliveries from other shards land there while this
//! task waits; the task writes the whole outbox in one write. It waits for whichever comes first:
//! bytes from the peer, or its doorbell (rung when something was queued for it, or at shutdown).
//! Until the session has its `Hello` it also waits for the handshake deadline, so a peer that
//! never speaks is closed without sending a byte.
//! While the session has `publishes_in_flight_max` publishes (or `publish_bytes_in_flight_max`
//! bytes of them) unconfirmed, or its shard has no room for more work (`ConnectionHost::has_room`),
//! it does not read at all, so a fast producer is slowed by TCP, not buffered; nor does it decode
//! further while its outbox holds more than `outbox_bytes_max` (answers the session makes at once,
//! such as listings, of a client that never reads): it writes them first. Fair service: it
//! takes in one read (at most `READ_CHUNK_BYTES` with what was left over) per turn, then yields,
//! so one connection's flood cannot starve the shard's worker or its other connections.
//! Deliveries are bounded from the other end: once a write is done the session hands their
//! charges back to their owners (`outbox_bytes_max`), so a peer that never reads stops being sent
//! more.
//!
//! It counts the bytes of each read and each write in its `ConnEntry` (for the connection
//! listing): per read and per write, never per message.
//!
//! Faults handled: the peer closing or resetting (the task ends; every shard releases what the
//! connection held), a malformed frame (an `Error` frame, then this connection closes; other
//! connections never notice), a slow reader (writes wait; nothing more is read meanwhile).
//!
//! The connection sees its shard only through `ConnectionHost`, so this layer does not depend on
//! the shard that drives it.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use weir_protocol::{FrameDecoder, WireLimits};

use crate::mesh::types::ConnRef;
use crate::net::session::{Addressed, Flow, Session};
use crate::rt::executor::{sleep, Doorbell, DoorbellWaiter};
use crate::rt::net::Connection;

/// A connection as its shard sees it: its session and the bytes owed to it.
pub struct ConnEntry {
    pub session: RefCell<Session>,
    pub outbox: RefCell<BytesMut>,
    pub bell: Doorbell,
    /// The peer's address, "ip:port" (for the connection listing).
    pub peer: String,
    /// Bytes read from the peer and written to it, counted per read and per write.
    pub bytes_received: Cell<u64>,
    pub bytes_sent: Cell<u64>,
}

/// What a connection needs of the shard it lives on.
pub trait ConnectionHost {
    /// Sends the ops a session routed to the shards that own their queues.
    fn submit(&self, from: ConnRef, outbound: Vec<Addressed>);
    /// The shard is shutting down: the session tells its peer and closes.
    fn is_stopping(&self) -> bool;
    /// The connection has ended: the shard forgets it.
    fn connection_closed(&self, id: u64);
    /// The time, ms since the Unix epoch: read by the shell once per wake-up and passed to the
    /// session, which never reads a clock itself.
    fn now_ms(&self) -> u64;
    /// Whether the shard takes more input (its queued work within its byte bounds).
    fn has_room(&self) -> bool;
    /// Connection `id` stopped reading for want of room: ring its doorbell when there is some.
    fn park(&self, id: u64);
}

/// Room reserved for a read: many frames per read under load. Also the most a connection takes
/// in per turn (fair service): after each read it yields to the shard's other tasks.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

enum Event {
    Read(std::io::Result<usize>),
    Rung,
    /// The session's handshake deadline came.
    Deadline,
}

/// Serves connection `me` until it closes; then tells every shard and unregisters it.
pub async fn serve<H: ConnectionHost>(
    mut conn: Connection,
    entry: Rc<ConnEntry>,
    waiter: DoorbellWaiter,
    shard: Rc<H>,
    me: ConnRef,
    wire: WireLimits,
) {
    let id = me.conn;
    let decoder = FrameDecoder::new(wire);
    // Empty until bytes arrive: `read_buf` reserves room only when there is something to read.
    let mut rx = bytes::BytesMut::new();
    loop {
        let mut flow = Flow::Continue;
        let mut outbound = Vec::new();
        let mut outbox_full = false;
        let (wants_input, deadline) = {
            let mut session = entry.session.borrow_mut();
            let mut out = entry.outbox.borrow_mut();
            let now_ms = shard.now_ms();
            while flow == Flow::Continue && shard.has_room() {
                if !session.wants_input_beside(out.len()) {
                    // The outbox is full of answers: write them, then decode the rest.
                    outbox_full = session.wants_input();
                    break;
                }
                match decoder.decode(&mut rx) {
                    Ok(Some(frame)) => {
                        flow = session.on_frame_at(now_ms, &frame, &mut out, &mut outbound)
                    }
                    Ok(None) => break,
                    Err(e) => flow = session.on_decode_error(&e, &mut out),
                }
            }
            if flow == Flow::Continue {
                flow = session.on_tick_at(now_ms, &mut out);
            }
            if flow == Flow::Continue && shard.is_stopping() {
                flow = session.on_shutdown(&mut out);
            }
            // Only until `Hello`: an open connection waits on no timer.
            let deadline = session
                .handshake_deadline()
                .map(|d| Duration::from_millis(d.saturating_sub(now_ms)));
            let room = shard.has_room();
            if !room {
                shard.park(id); // rung when the shard has room again
            }
            (session.wants_input() && room, deadline)
        };
        shard.submit(me, outbound);
        let owed = entry.outbox.borrow_mut().split();
        let charges = entry.session.borrow_mut().take_unwritten();
        if !owed.is_empty() {
            if let Err(e) = conn.write_all(&owed).await {
                tracing::debug!(connection = id, "write failed: {e}");
                break;
            }
            entry
                .bytes_sent
                .set(entry.bytes_sent.get() + owed.len() as u64);
        }
        // Written: the deliveries' owners may send that much more (`outbox_bytes_max`).
        let mut outbound = Vec::new();
        entry
            .session
            .borrow_mut()
            .on_written(charges, &mut outbound);
        shard.submit(me, outbound);
        if flow == Flow::Close {
            let _ = conn.close().await;
            break;
        }
        if outbox_full || !entry.outbox.borrow().is_empty() {
            continue; // more was queued while we wrote, or left to decode
        }
        let rung = async {
            waiter.wait().await;
            Event::Rung
        };
        // A peer that sends nothing must still be closed at its deadline.
        let rung = async {
            match deadline {
                Some(after) => {
                    let timer = async {
                        sleep(after).await;
                        Event::Deadline
                    };
                    futures_lite::future::or(rung, timer).await
                }
                None => rung.await,
            }
        };
        let event = if wants_input {
            let read = async { Event::Read(conn.read_buf(&mut rx, READ_CHUNK_BYTES).await) };
            futures_lite::future::or(read, rung).await
        } else {
            rung.await
        };
        match event {
            Event::Read(Ok(0)) => break,
            // Fair service: a connection whose peer keeps its socket full would otherwise find
            // every read ready and never give the worker or other connections a turn.
            Event::Read(Ok(n)) => {
                entry
                    .bytes_received
                    .set(entry.bytes_received.get() + n as u64);
                futures_lite::future::yield_now().await
            }
            Event::Rung | Event::Deadline => {}
            Event::Read(Err(e)) => {
                tracing::debug!(connection = id, "read failed: {e}");
                break;
            }
        }
    }
    let mut outbound = Vec::new();
    entry.session.borrow_mut().on_closed(&mut outbound);
    shard.submit(me, outbound);
    shard.connection_closed(id);
}
