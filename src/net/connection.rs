//! The I/O shell of one connection: read, decode, answer, write, on the shard that accepted it.
//!
//! Contract: one task per connection on its shard's executor; it owns the socket, the receive
//! buffer (frames are sliced out of it without copying) and the send buffer (every frame owed is
//! appended to it and it leaves in one write). It waits for whichever comes first: bytes from the
//! peer, or its doorbell (rung by the shard when it shuts down, and later when deliveries or
//! confirms are queued for this connection).
//!
//! Faults handled: the peer closing or resetting (the task ends; what it held is released), a
//! malformed frame (an `Error` frame, then this connection closes; other connections never notice),
//! a slow reader (writes wait, so this connection stops reading: backpressure, not buffering).

use std::rc::Rc;

use bytes::BytesMut;
use weir_protocol::FrameDecoder;

use crate::net::session::{Flow, Session};
use crate::rt::executor::DoorbellWaiter;
use crate::rt::net::Connection;
use crate::shard::ShardState;

/// Bytes read per syscall: many frames per read under load, a bounded zero-fill per read.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

enum Event {
    Read(std::io::Result<usize>),
    Rung,
}

/// Serves one connection until it closes; unregisters it from the shard on the way out.
pub async fn serve(
    mut conn: Connection,
    mut session: Session,
    waiter: DoorbellWaiter,
    shard: Rc<ShardState>,
    id: u64,
) {
    let decoder = FrameDecoder::new(shard.limits.wire);
    let mut rx = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut tx = BytesMut::new();
    loop {
        let mut flow = Flow::Continue;
        while flow == Flow::Continue {
            match decoder.decode(&mut rx) {
                Ok(Some(frame)) => flow = session.on_frame(&frame, &mut tx),
                Ok(None) => break,
                Err(e) => flow = session.on_decode_error(&e, &mut tx),
            }
        }
        if flow == Flow::Continue && shard.is_stopping() {
            flow = session.on_shutdown(&mut tx);
        }
        if !tx.is_empty() {
            if let Err(e) = conn.write_all(&tx).await {
                tracing::debug!(connection = id, "write failed: {e}");
                break;
            }
            tx.clear();
        }
        if flow == Flow::Close {
            let _ = conn.close().await;
            break;
        }
        let read = async { Event::Read(conn.read_buf(&mut rx, READ_CHUNK_BYTES).await) };
        let rung = async {
            waiter.wait().await;
            Event::Rung
        };
        match futures_lite::future::or(read, rung).await {
            Event::Read(Ok(0)) => break,
            Event::Read(Ok(_)) | Event::Rung => {}
            Event::Read(Err(e)) => {
                tracing::debug!(connection = id, "read failed: {e}");
                break;
            }
        }
    }
    shard.connection_closed(id);
}
