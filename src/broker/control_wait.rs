//! A client's routing change on its way: its answer goes once every shard's copy has applied it
//! and, where the durability policy says so, its records are durable.
//!
//! Contract: plain data on the control-plane writer's shard. Events in (opened, a copy applied,
//! the commit finished), the answer out when it is due; the shell sends it. A wait is answered
//! once and then forgotten; events for a wait already answered are ignored.

use std::collections::HashMap;

use crate::mesh::msg::Reply;
use crate::mesh::types::{ConnRef, Refusal};

/// An answer that is due: `reply` to request `id` of connection `to`.
#[derive(Debug)]
pub struct Answer {
    pub to: ConnRef,
    pub id: u64,
    pub reply: Reply,
}

#[derive(Debug)]
struct Wait {
    copies_left: u16,
    durable: bool,
    answer: Answer,
}

/// The routing changes waiting for their copies and commits, by wait id.
#[derive(Debug)]
pub struct ControlWaits {
    waits: HashMap<u64, Wait>,
    next: u64,
}

impl Default for ControlWaits {
    fn default() -> Self {
        ControlWaits {
            waits: HashMap::new(),
            // 0 names nothing anyone waits for.
            next: 1,
        }
    }
}

impl ControlWaits {
    /// Opens a wait for `copies` shards' acknowledgements and, unless `durable`, a commit.
    /// Returns its id (sent with the change to every copy) and the answer if it is due already.
    pub fn open(
        &mut self,
        to: ConnRef,
        id: u64,
        reply: Reply,
        copies: u16,
        durable: bool,
    ) -> (u64, Option<Answer>) {
        let wait = self.next;
        self.next += 1;
        self.waits.insert(
            wait,
            Wait {
                copies_left: copies,
                durable,
                answer: Answer { to, id, reply },
            },
        );
        (wait, self.answer_if_done(wait))
    }

    /// A shard's copy has applied change `wait`.
    pub fn applied(&mut self, wait: u64) -> Option<Answer> {
        if let Some(w) = self.waits.get_mut(&wait) {
            w.copies_left -= 1;
        }
        self.answer_if_done(wait)
    }

    /// The commit of change `wait`'s records finished: a failure becomes the answer.
    pub fn committed(&mut self, wait: u64, result: Result<(), Refusal>) -> Option<Answer> {
        if let Some(w) = self.waits.get_mut(&wait) {
            w.durable = true;
            if let Err(refusal) = result {
                w.answer.reply = Reply::Refused(refusal);
            }
        }
        self.answer_if_done(wait)
    }

    pub fn len(&self) -> usize {
        self.waits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waits.is_empty()
    }

    fn answer_if_done(&mut self, wait: u64) -> Option<Answer> {
        let done = self
            .waits
            .get(&wait)
            .is_some_and(|w| w.copies_left == 0 && w.durable);
        if !done {
            return None;
        }
        self.waits.remove(&wait).map(|w| w.answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_protocol::wire::ErrorCode;

    const A: ConnRef = ConnRef { shard: 1, conn: 5 };

    #[test]
    fn the_answer_waits_for_every_copy_and_the_commit() {
        let mut w = ControlWaits::default();
        let (wait, now) = w.open(A, 9, Reply::Done, 2, false);
        assert!(now.is_none());
        assert!(w.applied(wait).is_none());
        assert!(w.applied(wait).is_none());
        let a = w.committed(wait, Ok(())).expect("due");
        assert_eq!((a.to, a.id), (A, 9));
        assert!(matches!(a.reply, Reply::Done));
        assert!(w.is_empty());
        assert!(w.applied(wait).is_none(), "answered once");
    }

    #[test]
    fn a_change_without_copies_or_records_is_answered_at_once() {
        let mut w = ControlWaits::default();
        let (first, now) = w.open(A, 1, Reply::Done, 0, true);
        assert!(now.is_some());
        let (second, _) = w.open(A, 2, Reply::Done, 1, true);
        assert_ne!(first, 0);
        assert_ne!(first, second);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn a_failed_commit_becomes_the_answer() {
        let mut w = ControlWaits::default();
        let (wait, _) = w.open(A, 3, Reply::Done, 1, false);
        let refusal = Refusal {
            code: ErrorCode::DiskFull,
            message: "full".into(),
        };
        assert!(w.committed(wait, Err(refusal)).is_none());
        let a = w.applied(wait).expect("due");
        assert!(matches!(a.reply, Reply::Refused(r) if r.code == ErrorCode::DiskFull));
    }
}
