//! The confirmer: replies that wait for their group commit, answered in commit order.
//!
//! Contract: one task on the shard's thread. The worker hands it every request whose records
//! were journaled (`AwaitingCommit`, in the order it executed them, so their commits never go
//! down); it waits for the oldest one's commit, then takes every request whose commit has
//! finished with it, resolves those rounds in the host once (held messages become deliverable,
//! settlements are made or put back, one dispatch for all of it), cools what they wrote, and
//! sends their replies, each with its own commit's outcome.
//!
//! Why a FIFO and not a task per request: with one publish or one ack per frame, a commit
//! round carries hundreds of requests; a task each meant hundreds of wakes per round (every
//! waiter is woken by every commit), a host resolution and a dispatch round each. Now it is
//! one wake and one resolution per round, whatever the number of frames in it.
//!
//! Faults handled: a commit that fails answers exactly the requests whose records it carried
//! with the refusal (`durability::published`/`not_durable`), nothing is cooled for them; a
//! poisoned journal finishes every round at once (with its error).

use std::collections::VecDeque;
use std::rc::Rc;

use crate::broker::cooling::Written;
use crate::broker::durability;
use crate::mesh::msg::Reply;
use crate::mesh::types::ConnRef;
use crate::rt::executor::DoorbellWaiter;
use crate::storage::CommitId;

use super::ShardState;

/// A request whose records are staged: what it wrote, and its reply if it waits for them.
pub(super) struct AwaitingCommit {
    /// The commit carrying the request's newest record (and so all of them).
    pub commit: CommitId,
    pub from: ConnRef,
    pub id: u64,
    /// `None` when the reply already went (fsync interval or never): only cooling waits.
    pub reply: Option<Reply>,
    /// The commit round of each journaled message of a publish, in order.
    pub rounds: Vec<Option<CommitId>>,
    pub written: Written,
}

/// The requests waiting for their commits, oldest first.
#[derive(Default)]
pub(super) struct Awaiting {
    queue: VecDeque<AwaitingCommit>,
}

impl ShardState {
    /// Queues a request behind its commit; the confirmer answers it once that is durable.
    pub(super) fn await_commit(&self, a: AwaitingCommit) {
        {
            let mut awaiting = self.awaiting.borrow_mut();
            debug_assert!(awaiting.queue.back().is_none_or(|b| b.commit <= a.commit));
            awaiting.queue.push_back(a);
        }
        self.confirm_bell.ring();
    }

    /// The commit of the newest request waiting: a later one may not wait for an older commit.
    pub(super) fn newest_awaited(&self) -> Option<CommitId> {
        self.awaiting.borrow().queue.back().map(|a| a.commit)
    }

    /// The requests at the front whose commits have finished, once the oldest one's has.
    async fn next_finished(&self) -> Option<Vec<AwaitingCommit>> {
        let oldest = self.awaiting.borrow().queue.front().map(|a| a.commit)?;
        // The outcome is read again per request below; this only waits.
        let _ = self.journal.commit_round(oldest).await;
        let mut awaiting = self.awaiting.borrow_mut();
        let mut batch = Vec::new();
        while awaiting
            .queue
            .front()
            .is_some_and(|a| self.journal.round_finished(a.commit))
        {
            batch.extend(awaiting.queue.pop_front());
        }
        Some(batch)
    }
}

/// Answers waiting requests as their commits finish, until the shard stops.
pub(super) async fn confirm_forever(state: Rc<ShardState>, bell: DoorbellWaiter) {
    loop {
        let Some(batch) = state.next_finished().await else {
            if !bell.wait().await {
                return;
            }
            continue;
        };
        let Some(newest) = batch.last().map(|a| a.commit) else {
            continue;
        };
        let rounds: Vec<Option<CommitId>> = batch
            .iter()
            .flat_map(|a| a.rounds.iter().copied())
            .collect();
        // Every commit up to the newest has finished: resolve each round something waits
        // for, by its own outcome, and dispatch what that made owed once.
        let outcomes = state.resolve_commits(newest, &rounds).await;
        for a in batch {
            // Finished: this does not wait.
            let result = state.journal.commit_round(a.commit).await;
            if result.is_ok() {
                a.written.cool_over_budget(&mut state.host.borrow_mut());
            }
            let Some(reply) = a.reply else { continue };
            let reply = match (reply, result) {
                (Reply::Published(published), _) => {
                    Reply::Published(durability::published(published, &a.rounds, &outcomes))
                }
                (reply, Ok(())) => reply,
                (reply, Err(e)) => durability::not_durable(reply, durability::storage_refusal(e)),
            };
            state.reply_to(a.from, a.id, reply);
            state.release_held();
        }
    }
}
