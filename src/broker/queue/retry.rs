//! Retries with backoff: what becomes of a delivery that failed, and the books of the messages
//! waiting out a retry delay.
//!
//! Contract: part of `Queue` (same shard, same data, no I/O; time comes in as `now_ms`). A
//! *failure* is a client's nack or reject with requeue; a consumer that goes away, a delivery
//! handed back by a connection, a consumer timeout or a failed ack commit are not failures and
//! requeue at once as before. On a failure the queue decides (`decide`, a pure function):
//!
//! | queue's `retry_delays_ms` | `Nack.delay_ms` | failures so far (n, this one included) | then |
//! |---|---|---|---|
//! | any                       | any             | delivery count at `max_deliveries`  | given up as a requeue past it is (`requeue`) |
//! | any                       | 0               | not counted                         | ready again at once (`Requeue`)               |
//! | empty                     | absent          | not counted                         | ready again at once (`Requeue`)               |
//! | empty                     | d > 0           | not counted                         | delayed until now + d                         |
//! | k delays                  | absent          | n <= k                              | delayed until now + delays[n - 1]             |
//! | k delays                  | d               | n <= k                              | delayed until now + d                         |
//! | k delays                  | any             | n > k                               | RETRIES EXHAUSTED: dead-lettered, or dropped without a dead-letter exchange |
//!
//! A zero `delay_ms` asks for the message back at once without counting a failure: what the
//! client sends for deliveries it never showed the application (they arrived for a consumer
//! being cancelled), which are no more a failure than a consumer that goes away.
//!
//! A retry is the same message entering the delayed set again (`Queue::delayed`, `due`), under
//! its own sequence number and with its bytes where they are (hot or cold): no copy. Due times
//! are absolute wall-clock ms, so neither a restart nor a late timer moves them; the shard's
//! due timer (`shard::housekeeping::promote_when_due`) sleeps until the earliest one. When it
//! comes the message goes back to ready as a requeue does: in sequence order, past the queue's
//! length limits (it was accepted already). Its time to live still counts from when it was first
//! accepted.
//!
//! What is counted: per message, its failures so far (only in a queue with a retry policy, the
//! only place they decide anything), from its first failure until it leaves the queue; and which
//! delayed messages are retries (`QueueInfo.messages_retrying`). Both are keyed by sequence
//! number, one small entry per failed message still held, so they are bounded by the shard's
//! index (`queued_messages_max`) like the entries themselves.
//!
//! Durability (the shard's side, `broker::ops::settle`): a delayed retry of a journaled message
//! is a `Retry` record (queue, sequence number, due time, failures, deliveries), staged before
//! the retry applies; recovery (`broker::rebuild`) restores the newest such state of every live
//! message, so a message waiting out its delay comes back still waiting, and its failures count on.

use std::collections::BTreeSet;

use super::{Queue, QueueError, Settled};
use crate::broker::routing::hash::FastMap;
use crate::mesh::types::{HolderId, Seq};
use crate::storage::RetryEntry;
use weir_protocol::wire::DeathReason;

/// What becomes of a delivery that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Back to ready at once, as any requeue (which gives it up past `max_deliveries`).
    Requeue,
    /// Waits until `due_ms` (absolute); `failures` is its count so far (0 where not counted).
    Delay { due_ms: u64, failures: u32 },
    /// RETRIES EXHAUSTED: it failed after the last of the queue's delays, so the queue gives it
    /// up (dead-lettered, or dropped without a dead-letter exchange). The one place this case is
    /// decided; `Settled::why` (`RetriesExhausted`) carries it to the dead-letter path.
    Exhausted,
}

/// The retry decision for a failed delivery (the table in the module header). `failures_before`:
/// its failures before this one; `delivery_count`: its deliveries so far.
///
/// `now_ms` is the clock truncated to whole ms, up to 1 ms behind the real instant the failure
/// came in; so a delay of d ms is due at `now_ms + d + 1`, never sooner than d ms after it (and
/// at most 1 ms later: measured, that truncation made 5% of retries up to 0.55 ms early).
pub fn decide(
    delays_ms: &[u32],
    max_deliveries: Option<u32>,
    failures_before: u32,
    delivery_count: u32,
    delay_ms: Option<u32>,
    now_ms: u64,
) -> RetryDecision {
    if max_deliveries.is_some_and(|max| delivery_count >= max) || delay_ms == Some(0) {
        return RetryDecision::Requeue;
    }
    if delays_ms.is_empty() {
        return match delay_ms {
            Some(d) if d > 0 => RetryDecision::Delay {
                due_ms: due(now_ms, d),
                failures: 0,
            },
            _ => RetryDecision::Requeue,
        };
    }
    let failures = failures_before.saturating_add(1);
    let Some(policy_delay) = delays_ms.get(failures as usize - 1) else {
        return RetryDecision::Exhausted;
    };
    let d = delay_ms.unwrap_or(*policy_delay);
    RetryDecision::Delay {
        due_ms: if d == 0 { now_ms } else { due(now_ms, d) },
        failures,
    }
}

/// The first whole ms at least `delay_ms` after the real instant `now_ms` was read in.
fn due(now_ms: u64, delay_ms: u32) -> u64 {
    now_ms.saturating_add(u64::from(delay_ms)).saturating_add(1)
}

/// A queue's retry books (see the module header).
#[derive(Debug, Default)]
pub(super) struct Retries {
    /// Failures so far of each message that failed at least once and is still held, in a queue
    /// with a retry policy.
    failures: FastMap<Seq, u32>,
    /// The delayed messages that wait out a retry delay (a subset of `Queue::delayed`).
    waiting: BTreeSet<Seq>,
}

impl Retries {
    /// Messages waiting out a retry delay.
    pub(super) fn waiting(&self) -> u64 {
        self.waiting.len() as u64
    }

    /// A message left the queue: nothing of it is remembered.
    pub(super) fn forget(&mut self, seq: Seq) {
        if !self.failures.is_empty() {
            self.failures.remove(&seq);
        }
    }

    /// A delayed message left the delayed set (its time came, or it was purged): whether it was
    /// waiting out a retry.
    pub(super) fn leave_delayed(&mut self, seq: Seq) -> bool {
        !self.waiting.is_empty() && self.waiting.remove(&seq)
    }
}

impl<M: Clone> Queue<M> {
    /// The decision a failure of the outstanding delivery `seq` of `holder` would get now, and
    /// its sequence number and delivery count: what the shard journals before applying it.
    pub fn failure_plan(
        &self,
        holder: HolderId,
        seq: Seq,
        delay_ms: Option<u32>,
        now_ms: u64,
    ) -> Result<(RetryDecision, RetryEntry), QueueError> {
        let o = match self.outstanding.get(&seq) {
            Some(o) if o.holder == holder => o,
            _ => return Err(QueueError::NotOutstanding { holder, seq }),
        };
        let before = self.retry.failures.get(&seq).copied().unwrap_or(0);
        let decision = decide(
            &self.policy.retry_delays_ms,
            self.policy.max_deliveries,
            before,
            o.entry.delivery_count,
            delay_ms,
            now_ms,
        );
        let (due_ms, failures) = match decision {
            RetryDecision::Delay { due_ms, failures } => (due_ms, failures),
            _ => (now_ms, before),
        };
        let entry = RetryEntry {
            seq,
            due_ms,
            failures,
            delivery_count: o.entry.delivery_count,
        };
        Ok((decision, entry))
    }

    /// A failed delivery (a client's nack or reject with requeue): requeued, delayed until its
    /// retry is due, or given up (see `decide`); what it gave up goes to `settled`.
    pub fn fail(
        &mut self,
        holder: HolderId,
        seq: Seq,
        delay_ms: Option<u32>,
        now_ms: u64,
        settled: &mut Vec<Settled<M>>,
    ) -> Result<RetryDecision, QueueError> {
        let (decision, _) = self.failure_plan(holder, seq, delay_ms, now_ms)?;
        let o = self.take_outstanding(holder, seq)?;
        self.counts.nacked += 1;
        match decision {
            RetryDecision::Requeue => {
                self.requeue(o.entry, o.priority, settled);
            }
            RetryDecision::Delay { due_ms, failures } => {
                if failures > 0 {
                    self.retry.failures.insert(seq, failures);
                }
                self.delay_retry(due_ms, o.entry, o.priority);
            }
            RetryDecision::Exhausted => {
                // Through the dead-letter path, its history saying why.
                settled.push(self.dead_letter_or_drop(o.entry, DeathReason::RetriesExhausted));
            }
        }
        Ok(decision)
    }

    /// Puts a message into the delayed set as a retry due at `due_ms`.
    fn delay_retry(&mut self, due_ms: u64, mut entry: super::Entry<M>, priority: u8) {
        // A delayed entry's `enqueued_ms` is its due time (`due` is keyed by it), as for a
        // delayed publish: once ready again it counts from then.
        entry.enqueued_ms = due_ms;
        self.retry.waiting.insert(entry.seq);
        self.delay(due_ms, entry, priority);
    }

    /// Puts back a message recovered from the journal with its retry state: still waiting out
    /// its delay if `due_ms` is to come (deliveries as recorded), else ready with `deadline_ms`
    /// (one delivery more counted: it may have been delivered after its retry, before the
    /// restart). Its failures count on. In ascending sequence order with `restore`.
    #[allow(clippy::too_many_arguments)]
    pub fn restore_retry(
        &mut self,
        seq: Seq,
        msg: M,
        bytes: u32,
        retry: RetryEntry,
        deadline_ms: u64,
        now_ms: u64,
        priority: u8,
    ) {
        if retry.failures > 0 && !self.policy.retry_delays_ms.is_empty() {
            self.retry.failures.insert(seq, retry.failures);
        }
        if retry.due_ms > now_ms {
            self.restore_delayed(
                seq,
                msg,
                bytes,
                retry.due_ms,
                retry.delivery_count,
                priority,
            );
            self.retry.waiting.insert(seq);
            return;
        }
        self.restore(
            seq,
            msg,
            bytes,
            now_ms,
            deadline_ms,
            retry.delivery_count.saturating_add(1),
            priority,
        );
    }

    /// Failures so far of message `seq` (0: none counted).
    pub fn failures(&self, seq: Seq) -> u32 {
        self.retry.failures.get(&seq).copied().unwrap_or(0)
    }

    /// The earliest due time of a delayed message (a retry or a delayed publish), if any: when
    /// the shard's due timer must wake for this queue.
    pub fn next_due(&self) -> Option<u64> {
        self.due.first().map(|(at, _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_delays_each_failure_by_its_own_delay_then_gives_up() {
        let delays = [1000, 5000, 30_000];
        let at = |before| decide(&delays, None, before, before + 1, None, 10_000);
        assert_eq!(
            at(0),
            RetryDecision::Delay {
                due_ms: 11_001,
                failures: 1
            }
        );
        assert_eq!(
            at(1),
            RetryDecision::Delay {
                due_ms: 15_001,
                failures: 2
            }
        );
        assert_eq!(
            at(2),
            RetryDecision::Delay {
                due_ms: 40_001,
                failures: 3
            }
        );
        assert_eq!(at(3), RetryDecision::Exhausted);
        assert_eq!(at(70), RetryDecision::Exhausted);
    }

    #[test]
    fn a_nack_delay_replaces_the_policy_delay_but_not_its_count() {
        let delays = [1000, 5000];
        assert_eq!(
            decide(&delays, None, 0, 1, Some(7), 100),
            RetryDecision::Delay {
                due_ms: 108,
                failures: 1
            }
        );
        assert_eq!(
            decide(&delays, None, 2, 3, Some(7), 100),
            RetryDecision::Exhausted
        );
    }

    #[test]
    fn without_a_policy_only_a_nack_delay_delays_and_nothing_is_counted() {
        assert_eq!(decide(&[], None, 0, 1, None, 5), RetryDecision::Requeue);
        assert_eq!(decide(&[], None, 0, 1, Some(0), 5), RetryDecision::Requeue);
        assert_eq!(
            decide(&[], None, 0, 9, Some(u32::MAX), u64::MAX - 1),
            RetryDecision::Delay {
                due_ms: u64::MAX,
                failures: 0
            }
        );
    }

    #[test]
    fn max_deliveries_still_gives_a_message_up_as_a_requeue_does() {
        assert_eq!(
            decide(&[1000], Some(2), 0, 2, Some(50), 0),
            RetryDecision::Requeue
        );
        assert_eq!(
            decide(&[1000], Some(3), 0, 2, None, 0),
            RetryDecision::Delay {
                due_ms: 1001,
                failures: 1
            }
        );
    }

    #[test]
    fn a_nack_delay_of_zero_is_a_requeue_at_once_not_a_failure() {
        assert_eq!(
            decide(&[1000], None, 0, 1, Some(0), 5),
            RetryDecision::Requeue
        );
        assert_eq!(
            decide(&[1000], None, 1, 2, Some(0), 5),
            RetryDecision::Requeue
        );
    }

    #[test]
    fn a_policy_delay_of_zero_is_still_counted() {
        assert_eq!(
            decide(&[0, 0], None, 1, 2, None, 42),
            RetryDecision::Delay {
                due_ms: 42,
                failures: 2
            }
        );
    }
}
