//! What a shard's sessions count for its status: confirms sent and refusals by the limit they
//! name (`Tally`), shared by every session of the shard.
//!
//! Contract: runs on the connection's shard; one `Tally` per shard (`Rc`, `Cell`s), bumped by
//! the session where it encodes a confirm or an `Error` (a cell add per frame, never per
//! message), read by the shard when it answers `Status`. The names refusals are counted under
//! are the fixed list `LIMIT_NAMES`, so the set of counters is bounded whatever clients do.
//! No faults: a refusal naming no known limit is counted under `other`.

use std::cell::Cell;

use weir_protocol::wire::ErrorCode;

use crate::mesh::types::LIMIT_NAMES;

/// One shard's session counts.
#[derive(Debug)]
pub struct Tally {
    confirms: Cell<u64>,
    /// By index into `LIMIT_NAMES`.
    limit_hits: Box<[Cell<u64>]>,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            confirms: Cell::new(0),
            limit_hits: LIMIT_NAMES.iter().map(|_| Cell::new(0)).collect(),
        }
    }
}

impl Tally {
    /// Publishes confirmed (positively) to this shard's connections.
    pub fn confirms(&self) -> u64 {
        self.confirms.get()
    }

    pub(super) fn confirmed(&self, n: usize) {
        self.confirms.set(self.confirms.get() + n as u64);
    }

    /// An `Error` is sent: one over a limit is counted under the limit its message names (the
    /// longest name it contains, so `publish_bytes_in_flight_max` is not taken for a shorter
    /// one).
    pub(super) fn refused(&self, code: ErrorCode, message: &str) {
        let over_limit = code == ErrorCode::LimitExceeded;
        if !over_limit && code != ErrorCode::ConnectionLimit {
            return;
        }
        let named = LIMIT_NAMES
            .iter()
            .enumerate()
            .filter(|(_, n)| message.contains(*n))
            .max_by_key(|(_, n)| n.len())
            .map(|(i, _)| i);
        let index = match named {
            Some(i) => i,
            // A connection limit names its own reason (a handshake timeout says so in words).
            None if !over_limit => return,
            None => LIMIT_NAMES.len() - 1,
        };
        let c = &self.limit_hits[index];
        c.set(c.get() + 1);
    }

    /// The limits hit at least once, with how often.
    pub fn limit_hits(&self) -> Vec<(&'static str, u64)> {
        LIMIT_NAMES
            .iter()
            .zip(self.limit_hits.iter())
            .filter(|(_, c)| c.get() > 0)
            .map(|(n, c)| (*n, c.get()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_under_the_limit_they_name() {
        let t = Tally::default();
        t.refused(
            ErrorCode::LimitExceeded,
            "this connection has consumers_per_connection_max = 2 consumers".into(),
        );
        t.refused(ErrorCode::LimitExceeded, "over publish_bytes_in_flight_max");
        t.refused(ErrorCode::LimitExceeded, "some bound");
        t.refused(
            ErrorCode::NotFound,
            "queue 'queues_per_shard_max' not found",
        );
        t.refused(ErrorCode::ConnectionLimit, "no Hello within 10 ms");
        assert_eq!(
            t.limit_hits(),
            vec![
                ("publish_bytes_in_flight_max", 1),
                ("consumers_per_connection_max", 1),
                ("other", 1)
            ]
        );
    }

    #[test]
    fn the_limit_names_are_distinct_and_other_is_last() {
        let set: std::collections::BTreeSet<_> = LIMIT_NAMES.iter().collect();
        assert_eq!(set.len(), LIMIT_NAMES.len());
        assert_eq!(LIMIT_NAMES.last(), Some(&"other"));
    }
}
