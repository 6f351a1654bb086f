//! Observation on the session's side: what a shard's sessions count for its status (confirms
//! sent, refusals by the limit they name: `Tally`, shared by every session of the shard), what
//! one session tells the shard's connection listing (`SessionFacts`), and the listings of
//! connections and consumers gathered from every shard (`ListConnections`, `ListConsumers`).
//!
//! Contract: runs on the connection's shard. One `Tally` per shard (`Rc`, `Cell`s), bumped by
//! the session where it encodes a confirm or an `Error` (a cell add per frame, never per
//! message), read by the shard when it answers `Status`. The names refusals are counted under
//! are the fixed list `LIMIT_NAMES`, so the set of counters is bounded whatever clients do. A
//! listing is a gather like the queue listing's: one op per shard asking one more than the page,
//! folded in as each answers, then sorted (connections by id, consumers by queue and tag), cut
//! to the page (`LIST_PAGE_MAX`, one table per entry: within a client's verifier budget) and
//! `more` set when something was cut.
//!
//! Faults handled: a refusal naming no known limit is counted under `other`; a shard that
//! answers a listing with something else leaves its part out (the answer still comes once every
//! shard replied).

use std::cell::Cell;

use bytes::BytesMut;
use weir_protocol::wire::{self, BodyT, ErrorCode};
use weir_protocol::WireLimits;

use super::replies::LIST_PAGE_MAX;
use super::{Addressed, Flow, Pending, Session};
use crate::mesh::msg::{Op, Reply};
use crate::mesh::types::LIMIT_NAMES;

// A full page of connections or consumers (one table each) verifies in a default client.
const _: () = assert!(LIST_PAGE_MAX + 64 <= WireLimits::DEFAULT.verifier_tables_max);

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

    /// An `Error` is sent: one over a limit is counted under the limit its message names first
    /// (a refusal names the limit it hit, then perhaps one that could have made room: "...
    /// producers_per_shard_max ..., none idle for producer_idle_expiry_ms").
    pub(super) fn refused(&self, code: ErrorCode, message: &str) {
        let over_limit = code == ErrorCode::LimitExceeded;
        if !over_limit && code != ErrorCode::ConnectionLimit {
            return;
        }
        let named = LIMIT_NAMES
            .iter()
            .enumerate()
            .filter_map(|(i, n)| Some((message.find(n)?, std::cmp::Reverse(n.len()), i)))
            .min()
            .map(|(_, _, i)| i);
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

/// What one session tells its shard's connection listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionFacts {
    pub client_name: Option<String>,
    /// When it was accepted, ms since the Unix epoch.
    pub accepted_ms: u64,
    pub consumers: u32,
    pub deliveries_unacked: u64,
    pub publishes_unconfirmed: u64,
}

/// A connection listing waiting for its shards.
pub(super) struct ConnectionsGather {
    request_id: u64,
    remaining: u16,
    limit: usize,
    connections: Vec<wire::ConnectionInfoT>,
}

/// A consumer listing waiting for its shards.
pub(super) struct ConsumersGather {
    request_id: u64,
    remaining: u16,
    limit: usize,
    consumers: Vec<wire::ConsumerInfoT>,
}

/// The page a listing asks for: `limit` as the client sent it, 0 for the broker's page.
fn page_of(limit: u32) -> usize {
    if limit == 0 {
        LIST_PAGE_MAX
    } else {
        limit.min(LIST_PAGE_MAX as u32) as usize
    }
}

impl Session {
    /// This session's facts for the connection listing.
    pub fn facts(&self) -> SessionFacts {
        SessionFacts {
            client_name: self.client_name.clone(),
            accepted_ms: self.ctx.accepted_ms,
            consumers: self.consumers.len() as u32,
            deliveries_unacked: self.outstanding.len() as u64,
            publishes_unconfirmed: self.unconfirmed,
        }
    }

    pub(super) fn list_connections(
        &mut self,
        request_id: u64,
        after: Option<u64>,
        limit: u32,
        outbound: &mut Vec<Addressed>,
    ) -> Flow {
        let limit = page_of(limit);
        let shards = self.ctx.shard_count();
        let id = self.next_id();
        let gather = ConnectionsGather {
            request_id,
            remaining: shards,
            limit,
            connections: Vec::new(),
        };
        self.pending.insert(id, Pending::Connections(gather));
        for shard in 0..shards {
            // One more than the page, to know whether more follow.
            let op = Op::ListConnections {
                after,
                limit: limit + 1,
            };
            outbound.push(Addressed { shard, id, op });
        }
        Flow::Continue
    }

    pub(super) fn gathered_connections(
        &mut self,
        id: u64,
        mut gather: ConnectionsGather,
        reply: Reply,
        out: &mut BytesMut,
    ) {
        if let Reply::Connections(more) = reply {
            gather.connections.extend(more);
        }
        if gather.remaining > 1 {
            gather.remaining -= 1;
            self.pending.insert(id, Pending::Connections(gather));
            return;
        }
        let ConnectionsGather {
            request_id,
            limit,
            mut connections,
            ..
        } = gather;
        connections.sort_by_key(|c| c.id);
        let more = connections.len() > limit;
        connections.truncate(limit);
        let mut list = wire::ConnectionListT::default();
        list.connections = Some(connections);
        list.more = more;
        self.reply(out, request_id, BodyT::ConnectionList(Box::new(list)));
    }

    pub(super) fn list_consumers(
        &mut self,
        request_id: u64,
        prefix: &str,
        after_queue: &str,
        after_tag: &str,
        limit: u32,
        outbound: &mut Vec<Addressed>,
    ) -> Flow {
        let limit = page_of(limit);
        let shards = self.ctx.shard_count();
        let id = self.next_id();
        let gather = ConsumersGather {
            request_id,
            remaining: shards,
            limit,
            consumers: Vec::new(),
        };
        self.pending.insert(id, Pending::Consumers(gather));
        for shard in 0..shards {
            let op = Op::ListConsumers {
                prefix: prefix.to_string(),
                after_queue: after_queue.to_string(),
                after_tag: after_tag.to_string(),
                limit: limit + 1,
            };
            outbound.push(Addressed { shard, id, op });
        }
        Flow::Continue
    }

    pub(super) fn gathered_consumers(
        &mut self,
        id: u64,
        mut gather: ConsumersGather,
        reply: Reply,
        out: &mut BytesMut,
    ) {
        if let Reply::Consumers(more) = reply {
            gather.consumers.extend(more);
        }
        if gather.remaining > 1 {
            gather.remaining -= 1;
            self.pending.insert(id, Pending::Consumers(gather));
            return;
        }
        let ConsumersGather {
            request_id,
            limit,
            mut consumers,
            ..
        } = gather;
        consumers.sort_by(|a, b| (&a.queue, &a.tag).cmp(&(&b.queue, &b.tag)));
        let more = consumers.len() > limit;
        consumers.truncate(limit);
        let mut list = wire::ConsumerListT::default();
        list.consumers = Some(consumers);
        list.more = more;
        self.reply(out, request_id, BodyT::ConsumerList(Box::new(list)));
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
            "this connection has consumers_per_connection_max = 2 consumers",
        );
        t.refused(ErrorCode::LimitExceeded, "over publish_bytes_in_flight_max");
        t.refused(
            ErrorCode::LimitExceeded,
            "this shard holds producers_per_shard_max = 4 idempotent producers, none idle for \
             producer_idle_expiry_ms = 9 ms",
        );
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
                ("producers_per_shard_max", 1),
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
