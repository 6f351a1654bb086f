//! The shell's convenience: the session's entry points that need the time, reading the wall
//! clock themselves.
//!
//! Contract: the session proper takes the time as an argument (`*_at(now_ms, ...)`), so it stays
//! deterministic and testable; these wrappers are the one place in the session that reads the
//! clock. They exist so that callers written before the `*_at` methods keep compiling; a caller
//! that already knows the time (the shard, once per wakeup) should call `*_at` directly.
//!
//! Faults handled: a clock before the Unix epoch reads as 0.

use bytes::BytesMut;
use weir_protocol::InFrame;

use super::{Flow, Routed, Session};
use crate::broker::ops::Reply;

/// Now, in ms since the Unix epoch.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Session {
    /// `on_frame_at` with the wall clock.
    pub fn on_frame(
        &mut self,
        frame: &InFrame,
        out: &mut BytesMut,
        routed: &mut Vec<Routed>,
    ) -> Flow {
        self.on_frame_at(wall_clock_ms(), frame, out, routed)
    }

    /// `on_reply_at` with the wall clock.
    pub fn on_reply(
        &mut self,
        id: u64,
        reply: Reply,
        out: &mut BytesMut,
        routed: &mut Vec<Routed>,
    ) {
        self.on_reply_at(wall_clock_ms(), id, reply, out, routed)
    }
}
