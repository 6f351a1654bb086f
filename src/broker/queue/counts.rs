//! What a queue has done since it was declared or the broker started: the event counts a
//! `QueueInfo` reports (`messages_published` to `messages_dropped`) and the bytes its
//! outstanding deliveries hold (`bytes_unacked`).
//!
//! Contract: plain integers owned by their `Queue`, bumped by the queue itself where each event
//! already happens (a field increment: no lookup, no allocation per message), read only for a
//! queue's info. They are not journaled: a restart starts them again from 0, as Prometheus
//! counters may. No faults: nothing here can fail.

use weir_protocol::wire::DeathReason;

use crate::storage::SettleReason;

/// One queue's event counts and its unacked bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages accepted (stored: ready or delayed), dead letters included; a publish whose
    /// record could not be made durable is taken back out.
    pub published: u64,
    /// Deliveries to consumers and `Get`s, redeliveries and auto-acked ones included.
    pub delivered: u64,
    /// Of those, redeliveries (delivered before).
    pub redelivered: u64,
    /// Messages settled as acked: a consumer's ack (once durable) or an auto-ack delivery.
    pub acked: u64,
    /// Nacks and rejects taken, with or without requeue.
    pub nacked: u64,
    /// Messages handed to the queue's dead-letter exchange (expired ones included).
    pub dead_lettered: u64,
    /// Messages whose time to live ran out (dead-lettered or dropped).
    pub expired: u64,
    /// Messages settled as dropped (overflow, past `max_deliveries` or its retries, a reject
    /// without a dead-letter exchange) or purged.
    pub dropped: u64,
    /// Bytes of the messages outstanding (delivered, not yet settled).
    pub bytes_unacked: u64,
}

impl QueueCounts {
    /// Adds `other`'s event counts to these (a shard's totals over its queues, and over those
    /// it deleted); `bytes_unacked`, a level, is added too.
    pub fn add(&mut self, other: &QueueCounts) {
        self.published += other.published;
        self.delivered += other.delivered;
        self.redelivered += other.redelivered;
        self.acked += other.acked;
        self.nacked += other.nacked;
        self.dead_lettered += other.dead_lettered;
        self.expired += other.expired;
        self.dropped += other.dropped;
        self.bytes_unacked += other.bytes_unacked;
    }

    /// A message leaves the queue for good, settled for `reason`; `why` is what its dead-letter
    /// history would say (an expiry shows there whichever way it left).
    pub(super) fn left(&mut self, reason: SettleReason, why: DeathReason) {
        match reason {
            SettleReason::Acked => self.acked += 1,
            SettleReason::DeadLettered => self.dead_lettered += 1,
            SettleReason::Dropped | SettleReason::Purged => self.dropped += 1,
            SettleReason::Expired => {}
        }
        if why == DeathReason::Expired {
            self.expired += 1;
        }
    }
}
