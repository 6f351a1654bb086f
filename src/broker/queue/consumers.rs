//! Which consumer of a queue gets the next message: consumer priorities, round robin among
//! equals, and single active consumer.
//!
//! Contract: plain data inside one `Queue`, on the owning shard's thread. It keeps each
//! consumer's credit (`in_flight` against `prefetch`) and picks the consumer for one message
//! (`pick`), cheaply: consumers are grouped by priority (a `BTreeMap`, highest last), each group
//! in attach order with its own round-robin cursor, so a pick walks the groups from the highest
//! down and stops at the first consumer with credit that accepts; nothing is sorted per
//! delivery. While a higher-priority consumer has credit and accepts, a lower one gets nothing;
//! equal priorities share round robin (RabbitMQ's `x-priority`).
//!
//! With `single_active` (RabbitMQ's `x-single-active-consumer`) only the active consumer is
//! offered messages: the highest priority, the earliest attached among equals. When it goes
//! (cancelled, or its connection closed: the queue releases what it held) the next in that
//! order takes over at once. A consumer that outranks the active one takes over only once the
//! active one holds nothing (`in_flight == 0`), so two consumers never work the queue at once.
//! Faults handled: none beyond the queue's own (an unknown id changes nothing).

use std::collections::BTreeMap;

use crate::broker::routing::hash::FastMap;
use crate::mesh::types::HolderId;

#[derive(Clone, Debug)]
pub(super) struct Consumer {
    pub id: HolderId,
    pub prefetch: u32,
    pub in_flight: u32,
    pub auto_ack: bool,
    pub priority: i32,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        self.in_flight < self.prefetch
    }
}

/// Consumers of one priority, in attach order.
#[derive(Debug, Default)]
struct Group {
    members: Vec<HolderId>,
    /// Index into `members` of the next one to offer a message to.
    cursor: usize,
}

#[derive(Debug, Default)]
pub(super) struct Consumers {
    by_id: FastMap<HolderId, Consumer>,
    /// By priority, highest last; never holds an empty group.
    groups: BTreeMap<i32, Group>,
    single_active: bool,
    /// With `single_active`: the one consumer offered messages.
    active: Option<HolderId>,
}

impl Consumers {
    pub fn new(single_active: bool) -> Consumers {
        Consumers {
            single_active,
            ..Consumers::default()
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn contains(&self, id: HolderId) -> bool {
        self.by_id.contains_key(&id)
    }

    pub fn get(&self, id: HolderId) -> Option<&Consumer> {
        self.by_id.get(&id)
    }

    pub fn get_mut(&mut self, id: HolderId) -> Option<&mut Consumer> {
        self.by_id.get_mut(&id)
    }

    /// Adds a consumer (the caller checked it is new), last among its priority.
    pub fn add(&mut self, c: Consumer) {
        self.groups
            .entry(c.priority)
            .or_default()
            .members
            .push(c.id);
        self.by_id.insert(c.id, c);
        self.refresh_active();
    }

    /// Removes consumer `id`; returns whether it was one.
    pub fn remove(&mut self, id: HolderId) -> bool {
        let Some(c) = self.by_id.remove(&id) else {
            return false;
        };
        let group = self
            .groups
            .get_mut(&c.priority)
            .expect("a consumer's group exists");
        let i = group
            .members
            .iter()
            .position(|m| *m == id)
            .expect("a consumer is in its group");
        group.members.remove(i);
        if group.cursor > i {
            group.cursor -= 1;
        }
        if group.cursor >= group.members.len() {
            group.cursor = 0;
        }
        if group.members.is_empty() {
            self.groups.remove(&c.priority);
        }
        if self.active == Some(id) {
            self.active = None;
        }
        self.refresh_active();
        true
    }

    /// A delivery of `id`'s was settled or taken back: its credit returns.
    pub fn credit_back(&mut self, id: HolderId) {
        if let Some(c) = self.by_id.get_mut(&id) {
            assert!(c.in_flight > 0, "consumer {id} had no delivery in flight");
            c.in_flight -= 1;
            if c.in_flight == 0 && self.single_active {
                self.refresh_active();
            }
        }
    }

    /// `id` was handed a delivery it must ack.
    pub fn charge(&mut self, id: HolderId) {
        if let Some(c) = self.by_id.get_mut(&id) {
            c.in_flight += 1;
        }
    }

    /// With `single_active`, the consumer offered messages now.
    pub fn active(&self) -> Option<HolderId> {
        self.active
    }

    /// The consumer to offer the next message to: the first, from the highest priority down
    /// and round robin within each, with credit that `accepts` (which may charge it: it is
    /// asked only of a consumer with credit, once per pick). `None`: nobody takes it now. The
    /// chosen consumer's group moves its cursor past it.
    pub fn pick(&mut self, mut accepts: impl FnMut(&Consumer) -> bool) -> Option<&Consumer> {
        if self.single_active {
            let c = &self.by_id[&self.active?];
            return (c.has_credit() && accepts(c)).then_some(c);
        }
        for group in self.groups.values_mut().rev() {
            let n = group.members.len();
            for k in 0..n {
                let i = (group.cursor + k) % n;
                let c = &self.by_id[&group.members[i]];
                if c.has_credit() && accepts(c) {
                    group.cursor = (i + 1) % n;
                    return Some(c);
                }
            }
        }
        None
    }

    /// The consumer next in line for single active: the highest priority, earliest attached.
    fn first_in_line(&self) -> Option<HolderId> {
        let (_, group) = self.groups.last_key_value()?;
        group.members.first().copied()
    }

    /// Keeps the active consumer, unless it is gone, or holds nothing while one that outranks
    /// it waits: then the first in line takes over.
    fn refresh_active(&mut self) {
        if !self.single_active {
            return;
        }
        let keep = self
            .active
            .and_then(|a| self.by_id.get(&a))
            .is_some_and(|a| a.in_flight > 0);
        if !keep {
            self.active = self.first_in_line();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer(id: HolderId, prefetch: u32, priority: i32) -> Consumer {
        Consumer {
            id,
            prefetch,
            in_flight: 0,
            auto_ack: false,
            priority,
        }
    }

    /// Picks `n` times, charging each pick as dispatch does.
    fn picks(c: &mut Consumers, n: usize) -> Vec<Option<HolderId>> {
        (0..n)
            .map(|_| {
                let id = c.pick(|_| true).map(|c| c.id);
                if let Some(id) = id {
                    c.charge(id);
                }
                id
            })
            .collect()
    }

    #[test]
    fn a_higher_priority_with_credit_goes_first_and_equals_share_round_robin() {
        let mut c = Consumers::new(false);
        c.add(consumer(1, 10, 0));
        c.add(consumer(2, 2, 5));
        c.add(consumer(3, 2, 5));
        c.add(consumer(4, 10, -3));
        let got = picks(&mut c, 6);
        assert_eq!(
            got,
            [2, 3, 2, 3, 1, 1].map(Some).to_vec(),
            "the low one only once the high ones are full"
        );
        c.credit_back(3);
        assert_eq!(picks(&mut c, 1), vec![Some(3)]);
        c.remove(1);
        assert_eq!(picks(&mut c, 1), vec![Some(4)], "the lowest last of all");
    }

    #[test]
    fn a_consumer_that_refuses_is_skipped_for_the_next_in_order() {
        let mut c = Consumers::new(false);
        c.add(consumer(1, 10, 1));
        c.add(consumer(2, 10, 0));
        assert_eq!(c.pick(|x| x.id != 1).map(|x| x.id), Some(2));
        assert!(c.pick(|_| false).is_none());
    }

    #[test]
    fn single_active_serves_the_first_in_line_and_fails_over_in_order() {
        let mut c = Consumers::new(true);
        assert!(c.pick(|_| true).is_none());
        c.add(consumer(1, 2, 0));
        c.add(consumer(2, 2, 0));
        c.add(consumer(3, 2, 0));
        assert_eq!(c.active(), Some(1));
        assert_eq!(picks(&mut c, 3), vec![Some(1), Some(1), None]);
        // A higher priority arrives: it waits until the active one holds nothing.
        c.add(consumer(4, 2, 9));
        assert_eq!(c.active(), Some(1));
        c.credit_back(1);
        assert_eq!(c.active(), Some(1));
        c.credit_back(1);
        assert_eq!(c.active(), Some(4));
        assert_eq!(picks(&mut c, 1), vec![Some(4)]);
        // The active one goes: the next in line at once, even if it held deliveries.
        c.remove(4);
        assert_eq!(c.active(), Some(1));
        c.remove(1);
        assert_eq!(c.active(), Some(2));
        c.remove(2);
        c.remove(3);
        assert_eq!(c.active(), None);
    }
}
