//! The shard's housekeeping timers: expiry (every 100 ms), consumer timeouts (on the expiry
//! timer, every quarter of `consumer_timeout_ms` but at most every second), segment reclaim
//! (every 500 ms), and the due timer: delayed messages (retries, delayed publishes) promoted
//! when the earliest of them is due, not at the next expiry tick.
//!
//! Contract: three tasks on the shard's thread, off the data path. Expiry and consumer timeouts
//! do not touch the queues themselves: they ask the worker, in the worker's order, and the host
//! decides with the worker's `now_ms` (the expiry tick also forgets idle idempotent producers).
//! Reclaim follows the rule of
//! `broker::reclaim` and carries out its steps against the journal. Faults handled: a catalog
//! restatement that fails (a record refused, say for a full disk, or its commit failed) is logged
//! and told to the round, which then deletes nothing; a segment deletion that fails is logged and
//! ends the round. The next round tries again; nothing here can stop the shard. After a round
//! that deleted segments (and every 10 s), a disk reserve spent on a full disk is made again if
//! there is room (`storage::journal::reserve`), which is when the journal takes message records
//! again.

use std::rc::Rc;
use std::time::Duration;

use crate::broker::catalog::CatalogRecord;
use crate::broker::reclaim::{ReclaimRound, ReclaimStep, Restatement};
use crate::mesh::msg::Op;
use crate::rt;

use super::ShardState;

/// How often a shard settles the expired heads of its queues (dead-lettering them where the
/// queue says so). A message's TTL is honoured to within this, also in a queue nobody consumes.
const EXPIRE_EVERY: Duration = Duration::from_millis(100);

/// Expiry ticks between two looks for consumers past `timeout_ms`: a quarter of the timeout,
/// so a stuck consumer is cancelled within 1.25 times it, but at most once a second, since the
/// look passes over every outstanding delivery.
fn timeout_ticks(timeout_ms: u64) -> u64 {
    (timeout_ms / 4 / EXPIRE_EVERY.as_millis() as u64).clamp(1, 10)
}

/// Asks the worker, in its order, to expire what is due and to cancel consumers past
/// `consumer_timeout_ms` (0: never).
pub(super) async fn expire_forever(state: Rc<ShardState>) {
    let timeout_ms = state.limits.broker.consumer_timeout_ms;
    let every = timeout_ticks(timeout_ms);
    let mut tick = 0u64;
    loop {
        rt::executor::sleep(EXPIRE_EVERY).await;
        if state.host.borrow().queue_count() == 0 {
            continue;
        }
        state.request_of_own(state.id, 0, Op::Expire);
        tick += 1;
        if timeout_ms > 0 && tick.is_multiple_of(every) {
            state.request_of_own(state.id, 0, Op::ConsumerTimeouts { timeout_ms });
        }
    }
}

/// Wakes when the earliest delayed message of any queue here is due (to the timer's
/// resolution) and asks the worker, in its order, to promote what is due (`Op::Expire`). It
/// never scans the delayed messages: each queue keeps them ordered by due time, the host notes
/// the earliest one a retry, a restore or an expiry round sees (`QueueHost::take_due_hint`),
/// and the worker rings this timer's bell when that is earlier than what it sleeps for
/// (`arm_due_timer`). Once it fired it sleeps until the worker's `Op::Expire` has noted the
/// next due time. So a retry is late by the worker's queue and a timer tick (~100 µs), not by
/// an expiry interval; and due times are absolute, so nothing drifts.
pub(super) async fn promote_when_due(state: Rc<ShardState>, bell: rt::executor::DoorbellWaiter) {
    let first = state.host.borrow().next_due().unwrap_or(u64::MAX);
    state.due_next.set(state.due_next.get().min(first));
    loop {
        let at = state.due_next.get();
        if at == u64::MAX {
            if !bell.wait().await {
                return;
            }
            continue;
        }
        let now = super::now_ms();
        if at > now {
            let sleep = async {
                rt::executor::sleep(Duration::from_millis(at - now)).await;
                true
            };
            let rung = async { !bell.wait().await };
            if !futures_lite::future::or(sleep, rung).await {
                continue; // an earlier due time, or a new look: sleep again for it
            }
            if state.due_next.get() < at {
                continue;
            }
        }
        // Fired: the worker's expiry round promotes what is due and notes the next due time.
        state.due_next.set(u64::MAX);
        state.request_of_own(state.id, 0, Op::Expire);
    }
}

impl ShardState {
    /// After a request: wakes the due timer if the host noted a due time earlier than the one it
    /// sleeps for.
    pub(super) fn arm_due_timer(&self) {
        let Some(at) = self.host.borrow_mut().take_due_hint() else {
            return;
        };
        if at < self.due_next.get() {
            self.due_next.set(at);
            self.due_bell.ring();
        }
    }
}

/// How often a shard looks for journal segments it can delete. Reclaim is housekeeping: a timer
/// costs nothing on the data path, and a second's delay only defers freeing disk space.
const RECLAIM_EVERY: Duration = Duration::from_millis(500);

/// Reclaim ticks between two tries to make a missing disk reserve again when no round deleted
/// anything (10 s): the room was freed outside the broker, which is rare.
const RESERVE_RETRY_TICKS: u64 = 20;

/// Deletes journal segments as `broker::reclaim` says, one round per tick.
pub(super) async fn reclaim_forever(state: Rc<ShardState>) {
    let mut tick = 0u64;
    loop {
        rt::executor::sleep(RECLAIM_EVERY).await;
        tick += 1;
        let mut freed = false;
        let mut round = ReclaimRound::default();
        loop {
            let segments = state.journal.segments();
            match round.next(&segments, |n| state.liveness.live_in(n)) {
                ReclaimStep::Stop => break,
                ReclaimStep::Restate => round.restated(restate(&state).await),
                ReclaimStep::Reclaim(segment) => match state.journal.reclaim(segment).await {
                    Ok(()) => {
                        freed = true;
                        tracing::debug!(shard = state.id, segment, "reclaimed")
                    }
                    Err(e) => {
                        tracing::warn!(shard = state.id, segment, "reclaim: {e}");
                        break;
                    }
                },
            }
        }
        // A reserve spent on a full disk is made again once a round freed room for it; until
        // then the journal refuses message records. Tried after a round that deleted segments,
        // and now and then otherwise (room freed outside the broker): a try on a full disk holds
        // what it could allocate until it gives up, which a settle commit may need meanwhile.
        if state.journal.reserve_missing() && (freed || tick.is_multiple_of(RESERVE_RETRY_TICKS)) {
            if let Err(why) = state.journal.restore_reserve().await {
                tracing::debug!(shard = state.id, "reclaim: {why}");
            }
        } else if tick.is_multiple_of(RESERVE_RETRY_TICKS) {
            // Without a reserve to make (none configured, or it is whole), room freed outside the
            // broker is noticed the same way: the journal tries the disk again with its next
            // commit, instead of refusing every record until a restart.
            state.journal.resume_after_no_space();
        }
    }
}

/// Writes every durable queue's declaration and next sequence number (and, on the writer, the
/// durable exchanges and bindings; and every idempotent producer's window) again, and commits
/// them. Durable only if every record was
/// appended and the commit carrying the last one succeeded (commits complete in order, so that
/// one covers the rest); nothing to restate is trivially durable. A record the journal refuses
/// ends the restatement as incomplete: what was appended before it is staged and goes with a
/// later commit, harmlessly, since a restatement only repeats what is true.
async fn restate(state: &ShardState) -> Restatement {
    let mut records = state.host.borrow().restatement();
    if let Some(writer) = &state.control {
        records.extend(writer.borrow().restatement());
    }
    // Idempotent producers' windows: the stamped message records that built them may be in
    // the segments about to go.
    records.extend(
        state
            .producers
            .borrow()
            .restatement()
            .into_iter()
            .map(CatalogRecord::Producer),
    );
    let mut last = None;
    for record in &records {
        match state.journal.append_control(&record.encode()) {
            Ok(a) => last = Some(a),
            Err(e) => {
                tracing::warn!(
                    shard = state.id,
                    "reclaim: cannot restate the catalog, deleting nothing this round: {e}"
                );
                return Restatement::Incomplete;
            }
        }
    }
    if let Some(last) = last {
        if let Err(e) = state.journal.commit(&last).await {
            tracing::warn!(
                shard = state.id,
                "reclaim: restated catalog not durable, deleting nothing this round: {e}"
            );
            return Restatement::Incomplete;
        }
    }
    Restatement::Durable
}
