//! Queue expiry (`QueueArguments.expires_ms`, RabbitMQ's `x-expires`): when a queue unused for
//! that long is deleted, and what the journal must know for that to survive a restart.
//!
//! Contract: plain data and pure functions, no I/O and no clock (time comes in as `now_ms`,
//! wall-clock ms since the epoch, so a time written before a crash means the same after it).
//! The host (`broker::host::expiry`) keeps one `QueueExpiry` per queue declared with
//! `expires_ms` and a deadline set over them; it journals what the methods here return.
//!
//! A queue is *used* while it has consumers, and when it is declared (again, not passively) or
//! asked for a message (`Get`); publishing to it, inspecting it, or a passive declare is not a
//! use (as in RabbitMQ). It expires `expires_ms` after the last use once it has no consumers.
//!
//! Across a restart the rule is kept from the journal (`CatalogRecord::QueueUsage`): a durable
//! queue's record says "in use" (consumers attached) or "unused since T", where T is never
//! earlier than its last use. Becoming unused (declared, or its last consumer gone) writes the
//! exact time; a use while unused (`Get`, redeclare) writes only when the recorded T is already
//! behind it, and then writes T ahead of now by a lease step (a quarter of `expires_ms`, within
//! [`LEASE_STEP_MIN_MS`, `LEASE_STEP_MAX_MS`]), so a queue read by `Get` in a loop costs one
//! small record per step, not one per `Get`. Recovery resumes the timer from
//! min(T, now): the time the queue was unused before the crash counts, and it is never deleted
//! earlier than `expires_ms` after its last use; at most one lease step later than that. A queue
//! in use at the crash (or with no record: journaled before this existed) counts as used at
//! recovery. A use is counted across a crash once its record's commit is durable: the record
//! goes with the next group commit, and no reply waits for it.
//!
//! Faults handled: `expires_ms = 0` is refused at declare (RabbitMQ requires it positive).

/// The smallest lease step: a queue used by `Get` in a loop writes at most one record a second.
pub const LEASE_STEP_MIN_MS: u64 = 1_000;
/// The largest lease step: after a crash a queue outlives its last use by at most an hour more
/// than `expires_ms`.
pub const LEASE_STEP_MAX_MS: u64 = 3_600_000;

/// Refuses expiry arguments the broker cannot keep; the message names the field.
pub fn check(expires_ms: Option<u32>) -> Result<(), String> {
    match expires_ms {
        Some(0) => {
            Err("expires_ms must be at least 1 ms (0 would delete the queue at once)".into())
        }
        _ => Ok(()),
    }
}

/// One queue's expiry state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueExpiry {
    expires_ms: u64,
    /// Its record goes to the journal (a durable, non-exclusive queue).
    durable: bool,
    /// When it was last used while unused; `None` while it has consumers.
    unused_since: Option<u64>,
    /// What the journal says: `Some(None)` in use, `Some(Some(t))` unused since no earlier than
    /// `t`, `None` nothing yet.
    recorded: Option<Option<u64>>,
}

/// What to journal for a queue now: `QueueUsage` with this `unused_since_ms` (`None`: in use).
pub type Record = Option<Option<u64>>;

impl QueueExpiry {
    /// A queue just declared, unused from `now_ms`.
    pub fn declared(expires_ms: u32, durable: bool, now_ms: u64) -> (QueueExpiry, Record) {
        let mut e = QueueExpiry {
            expires_ms: u64::from(expires_ms),
            durable,
            unused_since: Some(now_ms),
            recorded: None,
        };
        let record = e.record(Some(now_ms));
        (e, record)
    }

    /// A durable queue recovered at `now_ms`, with the journal's last `recorded` usage.
    pub fn restored(expires_ms: u32, recorded: Option<Option<u64>>, now_ms: u64) -> QueueExpiry {
        let since = match recorded {
            Some(Some(t)) => t.min(now_ms),
            // In use at the crash, or never recorded: used at recovery, at the latest.
            Some(None) | None => now_ms,
        };
        QueueExpiry {
            expires_ms: u64::from(expires_ms),
            durable: true,
            unused_since: Some(since),
            recorded,
        }
    }

    /// When it expires if it stays unused; `None` while in use.
    pub fn deadline(&self) -> Option<u64> {
        self.unused_since.map(|t| t.saturating_add(self.expires_ms))
    }

    /// Time left before it expires if it stays unused; `None` while in use.
    pub fn expires_in(&self, now_ms: u64) -> Option<u64> {
        self.deadline().map(|d| d.saturating_sub(now_ms))
    }

    /// What the journal says now (for the re-statement before a reclaim).
    pub fn recorded(&self) -> Option<Option<u64>> {
        self.recorded
    }

    /// Its first consumer attached.
    pub fn in_use(&mut self) -> Record {
        self.unused_since = None;
        self.record(None)
    }

    /// Its last consumer went at `now_ms`.
    pub fn unused(&mut self, now_ms: u64) -> Record {
        self.unused_since = Some(now_ms);
        self.record(Some(now_ms))
    }

    /// Used at `now_ms` (a `Get`, a redeclare): while it has no consumers its timer starts
    /// again; the journal is told only when what it holds is behind `now_ms`.
    pub fn touched(&mut self, now_ms: u64) -> Record {
        // In use (consumers attached): nothing to renew.
        self.unused_since?;
        self.unused_since = Some(now_ms);
        match self.recorded {
            Some(Some(t)) if t >= now_ms => None,
            _ => {
                let step = (self.expires_ms / 4).clamp(LEASE_STEP_MIN_MS, LEASE_STEP_MAX_MS);
                self.record(Some(now_ms.saturating_add(step)))
            }
        }
    }

    fn record(&mut self, usage: Option<u64>) -> Record {
        if !self.durable || self.recorded == Some(usage) {
            return None;
        }
        self.recorded = Some(usage);
        Some(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unused_queue_expires_after_its_last_use_and_not_while_in_use() {
        let (mut e, r) = QueueExpiry::declared(10_000, true, 1_000);
        assert_eq!(r, Some(Some(1_000)), "the exact time it became unused");
        assert_eq!(e.deadline(), Some(11_000));
        assert_eq!(e.expires_in(4_000), Some(7_000));
        assert_eq!(e.in_use(), Some(None));
        assert_eq!((e.deadline(), e.expires_in(50_000)), (None, None));
        assert_eq!(
            e.touched(60_000),
            None,
            "a Get beside consumers changes nothing"
        );
        assert_eq!(e.unused(70_000), Some(Some(70_000)));
        assert_eq!(e.deadline(), Some(80_000));
        assert_eq!(
            check(Some(0)).map_err(|m| m.contains("expires_ms")),
            Err(true)
        );
        assert!(check(Some(1)).is_ok() && check(None).is_ok());
    }

    #[test]
    fn gets_renew_at_once_but_are_journaled_once_per_lease_step_ahead_of_them() {
        let (mut e, _) = QueueExpiry::declared(40_000, true, 0);
        // The first Get after the exact record writes a time a step (10 s) ahead.
        assert_eq!(e.touched(5), Some(Some(10_005)));
        for t in (100..=10_005).step_by(100) {
            assert_eq!(e.touched(t), None, "no record at {t}");
            assert_eq!(e.deadline(), Some(t + 40_000), "renewed in memory at once");
        }
        assert_eq!(e.touched(10_006), Some(Some(20_006)));
        // Steps are at least a second, and at most an hour.
        let (mut short, _) = QueueExpiry::declared(10, true, 0);
        assert_eq!(short.touched(1), Some(Some(1_001)));
        let (mut long, _) = QueueExpiry::declared(u32::MAX, true, 0);
        assert_eq!(long.touched(1), Some(Some(3_600_001)));
        // A transient queue journals nothing.
        let (mut t, r) = QueueExpiry::declared(10, false, 0);
        assert_eq!((r, t.touched(5_000), t.in_use()), (None, None, None));
    }

    #[test]
    fn recovery_counts_the_time_unused_before_the_crash_and_never_cuts_a_use_short() {
        // Unused since 1 000 (recorded), recovered at 5 000: 4 s of its 10 have gone.
        let e = QueueExpiry::restored(10_000, Some(Some(1_000)), 5_000);
        assert_eq!(e.deadline(), Some(11_000));
        // A lease ahead of recovery counts from recovery (the last use was before the crash).
        let e = QueueExpiry::restored(10_000, Some(Some(9_000)), 5_000);
        assert_eq!(e.deadline(), Some(15_000));
        // In use at the crash, or never recorded: used at recovery.
        for recorded in [Some(None), None] {
            let e = QueueExpiry::restored(10_000, recorded, 5_000);
            assert_eq!(e.deadline(), Some(15_000));
        }
        // Whatever Gets came after the last record, the recorded time is not before them.
        let (mut e, _) = QueueExpiry::declared(40_000, true, 0);
        let mut recorded = None;
        for t in (7..50_000).step_by(333) {
            if let Some(r) = e.touched(t) {
                recorded = r;
            }
            assert!(
                recorded.is_some_and(|r| r >= t),
                "a crash at {t} would cut it short"
            );
        }
    }
}
