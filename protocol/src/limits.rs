//! The wire's limits: every bound the codec enforces, in one place, each with its reason.
//!
//! The broker's own limit registry (`src/limits.rs`, `Limits`) starts from these defaults and may
//! tighten them per deployment; it never loosens them past what the relations below allow.
//! `WireLimits::check` asserts those relations, so a configuration that breaks them is refused
//! with the name of the limit, not discovered as a truncated frame at run time.

use crate::ProtocolError;

/// Bounds on what one peer may send another. Sent to clients in `Welcome.limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireLimits {
    /// Largest frame, bytes after the 4-byte length prefix. Checked before any buffer is grown for
    /// the frame, so a hostile length prefix costs nothing. 16 MiB fits a full publish batch of
    /// large messages while keeping one connection's receive buffer bounded.
    pub frame_size_max: u32,
    /// Largest `Message` flatbuffer, bytes. Must leave room for the frame's own tables, so a
    /// single maximal message always fits in one frame.
    pub message_size_max: u32,
    /// Most entries in one `Publish` frame. Bounds the per-frame verification work and the
    /// confirms one frame can owe.
    pub publish_batch_max: u32,
    /// Most deliveries in one `Deliver` frame.
    pub deliver_batch_max: u32,
    /// Most table visits the verifier makes for one frame. A publish of `publish_batch_max`
    /// entries touches about 3 tables per entry plus the frame and body; a hostile frame cannot
    /// make the verifier walk more than this.
    pub verifier_tables_max: usize,
    /// Deepest table nesting the verifier follows. The schema nests at most 5 deep (Frame, body,
    /// list, element, arguments); a message adds 2 (Message, Header).
    pub verifier_depth_max: usize,
    /// Longest name (queue, exchange, routing key, consumer tag), bytes. 255 as in AMQP, so names
    /// fit a one-byte length anywhere the broker stores them compactly.
    pub name_length_max: u32,
    /// Most headers in one message; bounds the verifier's work per message.
    pub headers_max: u32,
}

/// Bytes a frame spends beside its messages: the frame table, body table and vtables. Measured
/// with the encoder (a 1-entry publish adds under 200 bytes); 64 KiB leaves wide headroom for
/// routing keys and exchange names at `name_length_max`.
pub const FRAME_OVERHEAD_BYTES_MAX: u32 = 64 * 1024;

/// Length prefix in front of every frame.
pub const FRAME_PREFIX_BYTES: usize = 4;

/// Bytes a `Deliver` frame spends beside its deliveries and its consumer tag: the frame and body
/// tables and their vtables, the deliveries vector's length, the root offset, the tag's length
/// and terminator, and alignment padding. Measured with the encoder at under 100 bytes
/// (`deliver_bounds_cover_what_the_encoder_writes` checks it).
pub const DELIVER_FRAME_OVERHEAD_BYTES_MAX: usize = 128;

/// Bytes one delivery spends in a `Deliver` frame beside its message, exchange and routing key:
/// its table and vtable, the vectors' and strings' lengths, terminators and padding, and its
/// slot in the deliveries vector. Measured at under 100 bytes.
pub const DELIVERY_OVERHEAD_BYTES_MAX: usize = 128;

/// Most bytes a `Deliver` frame to a consumer tag of `consumer_tag_len` bytes takes beside its
/// deliveries (each bounded by `delivery_bytes_max`).
pub const fn deliver_frame_bytes_max(consumer_tag_len: usize) -> usize {
    DELIVER_FRAME_OVERHEAD_BYTES_MAX + consumer_tag_len
}

/// Most bytes one delivery takes in a `Deliver` frame. The encoder splits a batch into frames by
/// this bound, so a frame never exceeds `frame_size_max` whatever the batch.
pub const fn delivery_bytes_max(
    message_len: usize,
    exchange_len: usize,
    routing_key_len: usize,
) -> usize {
    DELIVERY_OVERHEAD_BYTES_MAX + message_len + exchange_len + routing_key_len
}

/// Most lines of dead-letter history a delivery carries (one per queue and reason it was
/// dead-lettered from; the broker keeps the most recent). Bounded so that a delivery's history
/// fits the frame's overhead headroom: 16 lines of three 255-byte names take under 13 KiB of
/// `FRAME_OVERHEAD_BYTES_MAX`'s 64 KiB.
pub const DEATHS_PER_DELIVERY_MAX: usize = 16;

/// Bytes one line of dead-letter history takes beside its names: its table and vtable, the
/// strings' lengths and terminators, its slot in the vector, padding.
pub const DEATH_OVERHEAD_BYTES_MAX: usize = 96;

/// Most bytes a delivery's dead-letter history takes in a `Deliver` frame.
pub fn deaths_bytes_max(deaths: &[crate::encode::DeathItem<'_>]) -> usize {
    if deaths.is_empty() {
        return 0;
    }
    // The vector's length and its field slot.
    16 + deaths
        .iter()
        .map(|d| DEATH_OVERHEAD_BYTES_MAX + d.queue.len() + d.exchange.len() + d.routing_key.len())
        .sum::<usize>()
}

impl WireLimits {
    pub const DEFAULT: WireLimits = WireLimits {
        frame_size_max: 16 * 1024 * 1024,
        message_size_max: 16 * 1024 * 1024 - FRAME_OVERHEAD_BYTES_MAX,
        publish_batch_max: 4096,
        deliver_batch_max: 1024,
        verifier_tables_max: 4 * 4096 + 64,
        verifier_depth_max: 16,
        name_length_max: 255,
        headers_max: 256,
    };

    /// Checks the relations between the limits; the error names the limit that breaks one.
    pub fn check(&self) -> Result<(), ProtocolError> {
        let fail =
            |limit: &'static str, reason: String| Err(ProtocolError::Limits { limit, reason });
        if self.frame_size_max < 1024 {
            return fail(
                "frame_size_max",
                format!("{} is below 1024 bytes", self.frame_size_max),
            );
        }
        if self.frame_size_max > i32::MAX as u32 {
            // flatbuffers offsets are 32-bit signed: a larger buffer is not addressable.
            return fail(
                "frame_size_max",
                format!("{} exceeds 2^31-1 bytes", self.frame_size_max),
            );
        }
        if self.message_size_max == 0
            || u64::from(self.message_size_max) + u64::from(FRAME_OVERHEAD_BYTES_MAX)
                > u64::from(self.frame_size_max)
        {
            return fail(
                "message_size_max",
                format!(
                    "{} must be at least 1 and leave {} bytes of frame overhead within frame_size_max {}",
                    self.message_size_max, FRAME_OVERHEAD_BYTES_MAX, self.frame_size_max
                ),
            );
        }
        if self.publish_batch_max == 0 || self.deliver_batch_max == 0 {
            return fail(
                "publish_batch_max",
                "batch limits must be at least 1".to_string(),
            );
        }
        let tables_needed = 4 * self.publish_batch_max.max(self.deliver_batch_max) as usize + 64;
        if self.verifier_tables_max < tables_needed {
            return fail(
                "verifier_tables_max",
                format!(
                    "{} cannot verify a full batch ({} tables needed)",
                    self.verifier_tables_max, tables_needed
                ),
            );
        }
        if self.verifier_depth_max < 8 {
            return fail(
                "verifier_depth_max",
                format!(
                    "{} is below the schema's nesting depth of 8",
                    self.verifier_depth_max
                ),
            );
        }
        if self.name_length_max == 0 || self.name_length_max > 65_535 {
            return fail(
                "name_length_max",
                format!("{} is not in 1..=65535", self.name_length_max),
            );
        }
        Ok(())
    }

    /// Verifier options for one frame: tight enough that a hostile frame costs bounded work.
    pub(crate) fn frame_verifier(&self) -> flatbuffers::VerifierOptions {
        flatbuffers::VerifierOptions {
            max_depth: self.verifier_depth_max,
            max_tables: self.verifier_tables_max,
            max_apparent_size: self.frame_size_max as usize,
            ignore_missing_null_terminator: false,
        }
    }

    /// Verifier options for one nested message: a message is small in tables (itself and one
    /// per header) however large its body, so the table budget is exactly `headers_max`: more
    /// headers than that fail verification (`TooManyTables`).
    pub(crate) fn message_verifier(&self) -> flatbuffers::VerifierOptions {
        flatbuffers::VerifierOptions {
            max_depth: 4,
            max_tables: self.headers_max as usize + 1,
            max_apparent_size: self.message_size_max as usize,
            ignore_missing_null_terminator: false,
        }
    }
}

impl Default for WireLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_satisfy_their_relations() {
        WireLimits::DEFAULT.check().unwrap();
    }

    #[test]
    fn a_message_limit_that_leaves_no_frame_overhead_is_refused() {
        let limits = WireLimits {
            message_size_max: WireLimits::DEFAULT.frame_size_max,
            ..WireLimits::DEFAULT
        };
        let err = limits.check().unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Limits {
                    limit: "message_size_max",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_verifier_budget_too_small_for_a_full_batch_is_refused() {
        let limits = WireLimits {
            verifier_tables_max: 100,
            ..WireLimits::DEFAULT
        };
        let err = limits.check().unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Limits {
                    limit: "verifier_tables_max",
                    ..
                }
            ),
            "{err}"
        );
    }
}
