//! Replies and durability: which replies wait for their group commit, what one becomes when its
//! records did not become durable, and the count of replies held back (shutdown waits for it).
//!
//! Contract: plain data and pure functions on one shard; the shell awaits the commit and sends.
//! A confirm (or a declare-ok) under `fsync = always` means on disk: the reply waits for the
//! group commit carrying the request's own records. Under `interval` and `never` the records are
//! staged, the committer makes them durable with the next group commit, and the reply goes now
//! (the confirm says which policy it was given under).
//!
//! A request's records may span several commits (a publish waits for journal room between its
//! messages), and a failed commit fails only what it and the commits after it carried: each
//! published message is answered by its own record's commit (`published`). A settlement whose
//! commit failed is answered as failed, never `Ok`, naming what is outstanding again (`not_durable`).

use std::collections::BTreeMap;

use weir_protocol::wire::{Durability, ErrorCode};

use crate::mesh::msg::{PublishOutcome, Reply};
use crate::mesh::types::Refusal;
use crate::storage::{CommitId, StorageError};

/// Whether a reply waits for the commit of its request's own records.
pub fn holds_for_commit(policy: Durability, own_records: bool) -> bool {
    own_records && policy == Durability::Always
}

/// A publish's answers once its commits finished: a journaled message whose own commit (`rounds`,
/// one per outcome) failed is refused with that commit's refusal; the others keep their answer
/// (durable ones are never refused for a later commit's failure).
pub fn published(
    outcomes: Vec<PublishOutcome>,
    rounds: &[Option<CommitId>],
    results: &BTreeMap<CommitId, Result<(), Refusal>>,
) -> Vec<PublishOutcome> {
    outcomes
        .into_iter()
        .zip(rounds.iter().copied().chain(std::iter::repeat(None)))
        .map(|(mut o, round)| {
            let failed = round.and_then(|r| results.get(&r)?.as_ref().err());
            if let (true, Some(refusal)) = (o.journaled, failed) {
                o.journaled = false;
                o.result = Err(refusal.clone());
            }
            o
        })
        .collect()
}

/// A reply whose records did not become durable: every journaled publish in it is refused, a
/// settlement's answer says it failed (`Settled` with the refusal first, and what waited for the
/// commit kept: outstanding again at the owner, so the connection keeps those tags), and
/// any other answer becomes the refusal.
pub fn not_durable(reply: Reply, refusal: Refusal) -> Reply {
    match reply {
        Reply::Settled(mut o) => {
            o.refusals.insert(0, refusal);
            let waiting = std::mem::take(&mut o.waiting);
            o.kept.extend(waiting);
            o.kept.sort_unstable();
            Reply::Settled(o)
        }
        Reply::Published(outcomes) => Reply::Published(
            outcomes
                .into_iter()
                .map(|mut o| {
                    if o.journaled {
                        o.journaled = false;
                        o.result = Err(refusal.clone());
                    }
                    o
                })
                .collect(),
        ),
        _ => Reply::Refused(refusal),
    }
}

/// What a client is told when the journal cannot take or keep a record.
pub fn storage_refusal(e: StorageError) -> Refusal {
    let code = match e {
        StorageError::NoSpace(_) => ErrorCode::DiskFull,
        _ => ErrorCode::StorageFailed,
    };
    Refusal {
        code,
        message: format!("not stored: {e}"),
    }
}

/// Replies held back for a commit (or, on the writer, for every copy's acknowledgement).
#[derive(Debug, Default)]
pub struct HeldReplies {
    count: usize,
}

impl HeldReplies {
    pub fn hold(&mut self) {
        self.count += 1;
    }

    /// A held reply went out; true when it was the last (shutdown may go on).
    pub fn release(&mut self) -> bool {
        self.count -= 1;
        self.count == 0
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::msg::{PublishOutcome, SettleOutcome};

    fn refusal() -> Refusal {
        Refusal {
            code: ErrorCode::StorageFailed,
            message: "gone".into(),
        }
    }

    #[test]
    fn only_always_holds_and_only_with_records() {
        assert!(holds_for_commit(Durability::Always, true));
        assert!(!holds_for_commit(Durability::Always, false));
        assert!(!holds_for_commit(Durability::Interval, true));
        assert!(!holds_for_commit(Durability::Never, true));
    }

    #[test]
    fn only_journaled_publishes_are_refused() {
        let outcome = |sequence, journaled| PublishOutcome {
            sequence,
            confirm: true,
            journaled,
            result: Ok(()),
            returned: None,
            duplicate: false,
        };
        let reply = Reply::Published(vec![outcome(1, true), outcome(2, false)]);
        let Reply::Published(out) = not_durable(reply, refusal()) else {
            panic!("still a publish answer");
        };
        assert_eq!(out[0].result, Err(refusal()));
        assert!(!out[0].journaled);
        assert_eq!(out[1].result, Ok(()));
        assert!(matches!(
            not_durable(Reply::Purged(3), refusal()),
            Reply::Refused(r) if r == refusal()
        ));
    }

    #[test]
    fn a_settlement_not_durable_is_answered_as_failed() {
        let waited = SettleOutcome {
            waiting: vec![0, 2],
            ..SettleOutcome::default()
        };
        assert!(matches!(
            not_durable(Reply::Settled(waited), refusal()),
            Reply::Settled(o) if o == SettleOutcome {
                refusals: vec![refusal()],
                kept: vec![0, 2],
                waiting: vec![],
            }
        ));
        let unknown = Refusal {
            code: ErrorCode::UnknownDeliveryTag,
            message: "no".into(),
        };
        let failed = SettleOutcome {
            refusals: vec![unknown.clone()],
            kept: vec![],
            waiting: vec![1],
        };
        assert!(matches!(
            not_durable(Reply::Settled(failed), refusal()),
            Reply::Settled(o) if o.refusals == vec![refusal(), unknown] && o.kept == vec![1]
        ));
    }

    #[test]
    fn each_message_is_answered_by_its_own_commit() {
        let outcome = |sequence, journaled| PublishOutcome {
            sequence,
            confirm: true,
            journaled,
            result: Ok(()),
            returned: None,
            duplicate: false,
        };
        let full = Refusal {
            code: ErrorCode::DiskFull,
            message: "full".into(),
        };
        let results = BTreeMap::from([(CommitId(4), Ok(())), (CommitId(5), Err(full.clone()))]);
        let out = published(
            vec![outcome(1, true), outcome(2, false), outcome(3, true)],
            &[Some(CommitId(4)), None, Some(CommitId(5))],
            &results,
        );
        assert_eq!(out[0].result, Ok(()), "durable in an earlier commit");
        assert!(out[0].journaled);
        assert_eq!(out[1].result, Ok(()), "not journaled at all");
        assert_eq!(out[2].result, Err(full));
        assert!(!out[2].journaled);
    }

    #[test]
    fn the_last_held_reply_says_so() {
        let mut held = HeldReplies::default();
        held.hold();
        held.hold();
        assert!(!held.release());
        assert!(!held.is_empty());
        assert!(held.release());
        assert!(held.is_empty());
    }
}
