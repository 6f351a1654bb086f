//! Which journal segment goes next: the reclaim rule, one round at a time.
//!
//! Contract: plain data for the shard's reclaim timer; the shell appends, commits and deletes.
//! Segments go from the oldest on, while the oldest holds no live message and is not being
//! appended to. Only a prefix of the log is ever deleted, so every settle record deleted with it
//! named a message deleted with it too. Before the first deletion of a round, every durable
//! queue's declaration and next sequence number are written again and committed: the segments
//! going away may hold the only copies. (One old unacked message pins every later segment:
//! moving it forward, `Journal::relocate`, is not done yet.)

use crate::storage::SegmentInfo;

/// What the reclaim timer does next.
#[derive(Debug, PartialEq, Eq)]
pub enum ReclaimStep {
    /// Nothing can go: the round is over.
    Stop,
    /// Write the catalog again and commit it, then ask again (the restatement may roll a
    /// segment). If that fails the round stops.
    Restate,
    /// Delete this segment, then ask again.
    Reclaim(u32),
}

/// One round of the reclaim timer.
#[derive(Debug, Default)]
pub struct ReclaimRound {
    restated: bool,
}

impl ReclaimRound {
    /// The next step, given the journal's segments (oldest first) and how many live messages
    /// each holds.
    pub fn next(&mut self, segments: &[SegmentInfo], live_in: impl Fn(u32) -> u64) -> ReclaimStep {
        let Some(oldest) = segments.iter().find(|s| !s.reclaimed) else {
            return ReclaimStep::Stop;
        };
        if oldest.active || live_in(oldest.number) > 0 {
            return ReclaimStep::Stop;
        }
        if !self.restated {
            self.restated = true;
            return ReclaimStep::Restate;
        }
        ReclaimStep::Reclaim(oldest.number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Position;

    fn seg(number: u32, reclaimed: bool, active: bool) -> SegmentInfo {
        SegmentInfo {
            number,
            first: Position::new(number, 0),
            end: Position::new(number, 0),
            reclaimed,
            active,
        }
    }

    #[test]
    fn the_catalog_is_restated_once_before_the_first_deletion() {
        let segments = [
            seg(1, true, false),
            seg(2, false, false),
            seg(3, false, true),
        ];
        let mut round = ReclaimRound::default();
        assert_eq!(round.next(&segments, |_| 0), ReclaimStep::Restate);
        assert_eq!(round.next(&segments, |_| 0), ReclaimStep::Reclaim(2));
        let segments = [
            seg(1, true, false),
            seg(2, true, false),
            seg(3, false, true),
        ];
        assert_eq!(round.next(&segments, |_| 0), ReclaimStep::Stop, "active");
    }

    #[test]
    fn a_live_message_pins_its_segment_and_every_later_one() {
        let segments = [seg(1, false, false), seg(2, false, false)];
        let mut round = ReclaimRound::default();
        assert_eq!(
            round.next(&segments, |n| u64::from(n == 1)),
            ReclaimStep::Stop
        );
        assert_eq!(round.next(&[], |_| 0), ReclaimStep::Stop);
    }
}
