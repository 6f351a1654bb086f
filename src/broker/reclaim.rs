//! Which journal segment goes next: the reclaim rule, one round at a time.
//!
//! Contract: plain data for the shard's reclaim timer; the shell appends, commits and deletes,
//! and tells the round how its restatement went. Segments go from the oldest on, while the
//! oldest holds no live message and is not being appended to. Only a prefix of the log is ever
//! deleted, so every settle record deleted with it named a message deleted with it too. Before
//! the first deletion of a round, every durable queue's declaration and next sequence number are
//! written again and committed: the segments going away may hold the only copies. So nothing is
//! deleted unless that whole restatement is durable; a round whose restatement failed (a full
//! disk refusing the records, a commit that failed) deletes nothing, and the next round tries
//! again. (One old unacked message pins every later segment: moving it forward,
//! `Journal::relocate`, is not done yet.)

use crate::storage::SegmentInfo;

/// What the reclaim timer does next.
#[derive(Debug, PartialEq, Eq)]
pub enum ReclaimStep {
    /// Nothing can go: the round is over.
    Stop,
    /// Write the catalog again and commit it, tell the round how that went
    /// ([`ReclaimRound::restated`]), then ask again (the restatement may roll a segment).
    Restate,
    /// Delete this segment, then ask again.
    Reclaim(u32),
}

/// How a restatement of the catalog went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restatement {
    /// Every record was appended and the commit carrying the last one is durable (or there was
    /// nothing to restate).
    Durable,
    /// Some record was refused or its commit failed: the segments may hold the only copies of
    /// what is missing.
    Incomplete,
}

/// Where a round stands with its restatement.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Catalog {
    /// Not asked for yet.
    #[default]
    Unstated,
    /// Asked for, outcome not told: counts as incomplete, so nothing is deleted on a guess.
    Asked,
    Durable,
    Incomplete,
}

/// One round of the reclaim timer.
#[derive(Debug, Default)]
pub struct ReclaimRound {
    catalog: Catalog,
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
        match self.catalog {
            Catalog::Unstated => {
                self.catalog = Catalog::Asked;
                ReclaimStep::Restate
            }
            Catalog::Durable => ReclaimStep::Reclaim(oldest.number),
            Catalog::Asked | Catalog::Incomplete => ReclaimStep::Stop,
        }
    }

    /// How the restatement asked for by [`ReclaimStep::Restate`] went.
    pub fn restated(&mut self, outcome: Restatement) {
        self.catalog = match outcome {
            Restatement::Durable => Catalog::Durable,
            Restatement::Incomplete => Catalog::Incomplete,
        };
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
        round.restated(Restatement::Durable);
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

    #[test]
    fn a_round_whose_restatement_failed_deletes_nothing_and_the_next_round_asks_again() {
        let segments = [
            seg(1, false, false),
            seg(2, false, false),
            seg(3, false, true),
        ];
        let mut round = ReclaimRound::default();
        assert_eq!(round.next(&segments, |_| 0), ReclaimStep::Restate);
        round.restated(Restatement::Incomplete);
        assert_eq!(round.next(&segments, |_| 0), ReclaimStep::Stop);
        assert_eq!(
            round.next(&segments, |_| 0),
            ReclaimStep::Stop,
            "asking again"
        );

        let mut next_round = ReclaimRound::default();
        assert_eq!(next_round.next(&segments, |_| 0), ReclaimStep::Restate);
        next_round.restated(Restatement::Durable);
        assert_eq!(next_round.next(&segments, |_| 0), ReclaimStep::Reclaim(1));
    }

    #[test]
    fn a_restatement_never_reported_deletes_nothing() {
        let segments = [seg(1, false, false), seg(2, false, true)];
        let mut round = ReclaimRound::default();
        assert_eq!(round.next(&segments, |_| 0), ReclaimStep::Restate);
        assert_eq!(round.next(&segments, |_| 0), ReclaimStep::Stop);
    }
}
