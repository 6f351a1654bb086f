//! The shard's side of the journal for the queue host: records staged for the next group commit.
//!
//! Contract: used by the worker while it executes one request, on the shard's thread. It
//! remembers the newest record the request appended (so the reply can wait for its commit) and
//! the messages it journaled (so they can be cooled once durable). Under fsync = always it tells
//! the host which commit round a message or a settlement waits for (`JournalSink`), so neither is
//! seen before it is durable. A record the journal cannot take is a `Refusal` for the client
//! (`DiskFull` on a full disk), never a panic.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::broker::catalog::CatalogRecord;
use crate::broker::cooling::Written;
use crate::broker::durability::storage_refusal;
use crate::broker::ops::JournalSink;
use crate::broker::stored::{Liveness, Stored};
use crate::mesh::msg::PublishItem;
use crate::mesh::types::Refusal;
use crate::mesh::types::Seq;
use crate::rt::fs::DmaDir;
use weir_protocol::wire::Durability;

use crate::storage::{
    Appended, CommitId, Journal, MessageEnvelope, ProducerStamp, RetryEntry, RetryRecord,
    SettleReason, SettleRecord, StorageError, Target,
};

use super::ShardState;

/// The shard's side of the journal for the queue host: records staged for the next group
/// commit, remembering the newest so the request's reply can wait for its commit.
pub(super) struct Staging<'a> {
    journal: &'a Journal<DmaDir>,
    appended: &'a Cell<Option<Appended>>,
    /// Messages journaled by the current request, newest last: cooled after their commit if the
    /// shard is over its payload budget.
    written: &'a RefCell<Written>,
    liveness: &'a Rc<Liveness>,
    /// fsync = always: what is journaled waits for its commit before it is seen.
    hold: bool,
    /// The idempotent producer's stamp for the message being published, if it is one's: its
    /// record carries it, so replay rebuilds the producer windows.
    pub(super) stamp: Option<ProducerStamp>,
}

impl Staging<'_> {
    fn note(&self, result: Result<Appended, StorageError>) -> Result<Option<CommitId>, Refusal> {
        let a = result.map_err(storage_refusal)?;
        if self
            .appended
            .get()
            .is_none_or(|prev| prev.commit <= a.commit)
        {
            self.appended.set(Some(a));
        }
        Ok(self.hold.then_some(a.commit))
    }
}

impl JournalSink for Staging<'_> {
    fn message(
        &mut self,
        targets: &[(&str, Seq)],
        msg: &Rc<Stored>,
    ) -> Result<Option<CommitId>, Refusal> {
        let envelope = MessageEnvelope {
            exchange: msg.exchange.as_bytes(),
            routing_key: msg.routing_key.as_bytes(),
            targets: targets
                .iter()
                .map(|(queue, seq)| Target {
                    queue: queue.as_bytes(),
                    queue_seq: *seq,
                })
                .collect(),
            deaths: msg.deaths.as_deref().unwrap_or(&[]),
        };
        let payload = msg.payload();
        let appended = self
            .journal
            .append_message_stamped(&envelope, self.stamp, &payload)
            .map_err(storage_refusal)?;
        msg.set_position(appended.position, appended.len, Some(self.liveness));
        self.written.borrow_mut().note(targets);
        self.note(Ok(appended))
    }

    fn settle(
        &mut self,
        queue: &str,
        reason: SettleReason,
        ranges: &[(u64, u64)],
    ) -> Result<Option<CommitId>, Refusal> {
        let record = SettleRecord {
            queue: queue.as_bytes(),
            reason,
            ranges: ranges.to_vec(),
        };
        self.note(self.journal.append_settle(&record))
    }

    fn catalog(&mut self, record: &CatalogRecord) -> Result<(), Refusal> {
        self.note(self.journal.append_control(&record.encode()))
            .map(|_| ())
    }

    fn retry(&mut self, queue: &str, entries: &[RetryEntry]) -> Result<Option<CommitId>, Refusal> {
        let record = RetryRecord {
            queue: queue.as_bytes(),
            entries: entries.to_vec(),
        };
        self.note(self.journal.append_retry(&record))
    }
}

impl ShardState {
    /// The journal sink for the request being executed.
    pub(super) fn staging(&self) -> Staging<'_> {
        Staging {
            journal: &self.journal,
            appended: &self.appended,
            written: &self.written,
            liveness: &self.liveness,
            hold: self.session.durability == Durability::Always,
            stamp: None,
        }
    }
}

/// Room to ask the journal for, per published message: its bytes, the record header and an
/// envelope (exchange, key, one target).
pub(super) fn record_room(item: &PublishItem) -> usize {
    let targets: usize = item.also.iter().map(|q| q.len() + 16).sum();
    item.bytes.len()
        + item.exchange.len()
        + item.routing_key.len()
        + item.queue.len()
        + targets
        + item.deaths.as_ref().map_or(0, |h| 9 + h.len())
        + 16
        + 64
}
