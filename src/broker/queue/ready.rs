//! A queue's ready list: the waiting messages in the order they are handed out.
//!
//! Contract: plain data, owned by its queue (one shard's thread). A plain queue (`priority_max`
//! 0) keeps one `VecDeque` in sequence order, exactly as before priorities existed: no level
//! lookup, no bitmap (one more branch per step: `benches/README.md` measured +0.7 % of a
//! message's instructions for everything priorities added to a plain queue). A priority queue keeps one FIFO per priority
//! level it has actually met (a level's buffer is allocated on its first message), each in
//! sequence order, and a 256-bit bitmap of the levels that hold something, so the next message
//! (the front of the highest non-empty level) is found with at most four word tests whatever the
//! number of levels, and a push finds its level through a 256-byte slot table. The priority of
//! an entry is where it is: an entry costs no byte more than in a plain queue.
//!
//! Within a level entries stay in sequence order: a publish appends (sequence numbers only
//! grow), and an entry coming back (a requeue, a delayed message whose time came) is inserted by
//! sequence number, so a requeued message goes back to the front of its own level, before the
//! younger ones, as in a plain queue.
//!
//! Memory: a level under a quarter full gives half its buffer back once it is larger than
//! `READY_KEPT_CAPACITY` (plain) or `LEVEL_KEPT_CAPACITY` (a priority level), so a drained
//! backlog returns its index memory and a queue using all 256 levels keeps at most
//! `256 * LEVEL_KEPT_CAPACITY` idle entries' worth.

use std::collections::VecDeque;

use crate::mesh::types::Seq;

/// What the ready list needs to know of an entry: its sequence number.
pub trait Sequenced {
    fn seq(&self) -> Seq;
}

/// A plain ready list at least this long keeps its allocation; a longer one gives back half of
/// it when it falls under a quarter full (each element moved at most once per halving).
const READY_KEPT_CAPACITY: usize = 4096;

/// The same rule for each level of a priority queue, lower, since a queue may have 256 of them:
/// at most 256 * 256 idle entries (3 MiB at 48 bytes) per queue, usually a few levels.
const LEVEL_KEPT_CAPACITY: usize = 256;

/// The ready list of one queue.
#[derive(Debug)]
pub enum Ready<E> {
    /// `priority_max` 0: one FIFO, in sequence order.
    Plain(VecDeque<E>),
    /// `priority_max` > 0.
    Levels(Box<Levels<E>>),
}

/// The levels of a priority queue.
#[derive(Debug)]
pub struct Levels<E> {
    /// Bit `p` set: level `p` holds at least one entry.
    nonempty: [u64; 4],
    /// Index into `fifos` of level `p`'s FIFO, 0 meaning none yet for `p > 0`: level 0 is
    /// always `fifos[0]`, so the other 255 levels' indices fit a byte.
    slot: [u8; 256],
    fifos: Vec<VecDeque<E>>,
    /// Entries in all levels together: `len` is O(1).
    len: usize,
    /// Entries from this sequence number on are not handed out yet (their commit is not
    /// durable): a level whose front is held is passed over for the next one down, since its
    /// messages have not arrived yet, while the arrived ones keep their order.
    hold: Option<Seq>,
}

impl<E: Sequenced> Ready<E> {
    /// An empty ready list for a queue ordering by priorities up to `priority_max` (0: none).
    pub fn new(priority_max: u8) -> Ready<E> {
        if priority_max == 0 {
            return Ready::Plain(VecDeque::new());
        }
        Ready::Levels(Box::new(Levels {
            nonempty: [0; 4],
            slot: [0; 256],
            fifos: vec![VecDeque::new()],
            len: 0,
            hold: None,
        }))
    }

    pub fn len(&self) -> usize {
        match self {
            Ready::Plain(q) => q.len(),
            Ready::Levels(l) => l.len,
        }
    }

    /// The entry handed out next: the oldest of the highest non-empty level (whose front is not
    /// held, in a priority queue: a plain queue's caller stops at a held head itself).
    pub fn front(&self) -> Option<&E> {
        match self {
            Ready::Plain(q) => q.front(),
            Ready::Levels(l) => l.fifo(l.next_level()?)?.front(),
        }
    }

    /// Takes the entry handed out next, with its level.
    pub fn pop_front(&mut self) -> Option<(E, u8)> {
        match self {
            Ready::Plain(q) => {
                let e = q.pop_front()?;
                give_back(q, READY_KEPT_CAPACITY);
                Some((e, 0))
            }
            Ready::Levels(l) => {
                let p = l.next_level()?;
                Some((l.pop_front_at(p).expect("a non-empty level"), p))
            }
        }
    }

    /// Holds back the entries from `from` on (see `Levels::hold`); a plain list leaves that to
    /// its queue.
    pub fn set_hold(&mut self, from: Option<Seq>) {
        if let Ready::Levels(l) = self {
            l.hold = from;
        }
    }

    /// Appends an entry newer than every other of its level (a publish, a restore).
    pub fn push_back(&mut self, e: E, priority: u8) {
        match self {
            Ready::Plain(q) => q.push_back(e),
            Ready::Levels(l) => {
                let f = l.fifo_mut(priority);
                f.push_back(e);
                l.filled(priority);
            }
        }
    }

    /// Puts an entry into its level by sequence number (a requeue, a promoted delayed message):
    /// before every younger one, after every older one.
    pub fn insert(&mut self, e: E, priority: u8) {
        let q = match self {
            Ready::Plain(q) => q,
            Ready::Levels(l) => {
                l.filled(priority);
                l.fifo_mut(priority)
            }
        };
        if q.back().is_none_or(|last| last.seq() < e.seq()) {
            q.push_back(e);
        } else {
            let at = q.partition_point(|x| x.seq() < e.seq());
            q.insert(at, e);
        }
    }

    /// The newest entry of `priority`'s level (where a restore appends).
    pub fn back_at(&self, priority: u8) -> Option<&E> {
        match self {
            Ready::Plain(q) => q.back(),
            Ready::Levels(l) => l.fifo(priority)?.back(),
        }
    }

    /// The lowest non-empty level (`DropHead` drops from its front), 0 for a plain queue.
    pub fn lowest(&self) -> Option<u8> {
        match self {
            Ready::Plain(q) => (!q.is_empty()).then_some(0),
            Ready::Levels(l) => l.lowest(),
        }
    }

    /// The non-empty levels, highest first (one, 0, for a plain queue that holds something):
    /// a copy of the bitmap, so the list may change while it is walked.
    pub fn levels(&self) -> Bits {
        match self {
            Ready::Plain(q) => Bits([u64::from(!q.is_empty()), 0, 0, 0]),
            Ready::Levels(l) => Bits(l.nonempty),
        }
    }

    /// The oldest entry of level `priority`.
    pub fn front_at(&self, priority: u8) -> Option<&E> {
        match self {
            Ready::Plain(q) => q.front(),
            Ready::Levels(l) => l.fifo(priority)?.front(),
        }
    }

    /// Takes the oldest entry of level `priority`.
    pub fn pop_front_at(&mut self, priority: u8) -> Option<E> {
        match self {
            Ready::Plain(q) => {
                let e = q.pop_front()?;
                give_back(q, READY_KEPT_CAPACITY);
                Some(e)
            }
            Ready::Levels(l) => l.pop_front_at(priority),
        }
    }

    /// Every entry, in no particular order across levels.
    pub fn iter(&self) -> impl Iterator<Item = &E> {
        let fifos = match self {
            Ready::Plain(q) => std::slice::from_ref(q),
            Ready::Levels(l) => &l.fifos[..],
        };
        fifos.iter().flatten()
    }

    /// The entry `seq`, wherever it waits: a binary search per non-empty level.
    pub fn get_mut(&mut self, seq: Seq) -> Option<&mut E> {
        let (p, at) = self.find(seq)?;
        self.fifo_of_mut(p).get_mut(at)
    }

    /// Takes the entry `seq` out, wherever it waits.
    pub fn remove(&mut self, seq: Seq) -> Option<E> {
        let (p, at) = self.find(seq)?;
        let e = self.fifo_of_mut(p).remove(at).expect("found");
        if let Ready::Levels(l) = self {
            l.taken(p);
        }
        Some(e)
    }

    /// Takes the entry `seq` out if it is the newest of its level (a publish being retracted).
    pub fn pop_back_if(&mut self, seq: Seq) -> Option<E> {
        let p = self
            .levels()
            .find(|p| self.back_at(*p).is_some_and(|e| e.seq() == seq))?;
        let e = self.fifo_of_mut(p).pop_back().expect("found");
        if let Ready::Levels(l) = self {
            l.taken(p);
        }
        Some(e)
    }

    fn find(&self, seq: Seq) -> Option<(u8, usize)> {
        self.levels().find_map(|p| {
            let q = match self {
                Ready::Plain(q) => q,
                Ready::Levels(l) => l.fifo(p)?,
            };
            let at = q.partition_point(|e| e.seq() < seq);
            q.get(at).is_some_and(|e| e.seq() == seq).then_some((p, at))
        })
    }

    fn fifo_of_mut(&mut self, priority: u8) -> &mut VecDeque<E> {
        match self {
            Ready::Plain(q) => q,
            Ready::Levels(l) => l.fifo_mut(priority),
        }
    }
}

impl<E: Sequenced> Levels<E> {
    /// The level handed out from next: the highest non-empty one whose front is not held. With
    /// no hold (or an unheld top level, the common case) that is the highest set bit.
    fn next_level(&self) -> Option<u8> {
        let Some(h) = self.hold else {
            return self.highest();
        };
        Bits(self.nonempty).find(|p| {
            self.fifo(*p)
                .and_then(VecDeque::front)
                .is_some_and(|e| e.seq() < h)
        })
    }
}

impl<E> Levels<E> {
    fn highest(&self) -> Option<u8> {
        (0..4).rev().find_map(|w| {
            let bits = self.nonempty[w];
            (bits != 0).then(|| (w as u32 * 64 + 63 - bits.leading_zeros()) as u8)
        })
    }

    fn lowest(&self) -> Option<u8> {
        (0..4).find_map(|w| {
            let bits = self.nonempty[w];
            (bits != 0).then(|| (w as u32 * 64 + bits.trailing_zeros()) as u8)
        })
    }

    /// Level `priority`'s FIFO, `None` if it never held anything.
    fn fifo(&self, priority: u8) -> Option<&VecDeque<E>> {
        let i = self.slot[usize::from(priority)];
        (priority == 0 || i > 0).then(|| &self.fifos[usize::from(i)])
    }

    fn fifo_mut(&mut self, priority: u8) -> &mut VecDeque<E> {
        let s = usize::from(priority);
        if priority > 0 && self.slot[s] == 0 {
            // The level's first message: its FIFO is made now; unused levels cost one byte.
            self.slot[s] = u8::try_from(self.fifos.len()).expect("at most 255 levels above 0");
            self.fifos.push(VecDeque::new());
        }
        &mut self.fifos[usize::from(self.slot[s])]
    }

    fn filled(&mut self, priority: u8) {
        self.len += 1;
        self.nonempty[usize::from(priority / 64)] |= 1 << (priority % 64);
    }

    fn taken(&mut self, priority: u8) {
        self.len -= 1;
        let f = self.fifo_mut(priority);
        let empty = f.is_empty();
        give_back(f, LEVEL_KEPT_CAPACITY);
        if empty {
            self.nonempty[usize::from(priority / 64)] &= !(1 << (priority % 64));
        }
    }

    fn pop_front_at(&mut self, priority: u8) -> Option<E> {
        let e = self.fifo_mut(priority).pop_front()?;
        self.taken(priority);
        Some(e)
    }
}

/// A set of levels, walked highest first: a few word tests per level, whatever the gaps.
#[derive(Clone, Copy, Debug)]
pub struct Bits([u64; 4]);

impl Iterator for Bits {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let w = (0..4).rev().find(|w| self.0[*w] != 0)?;
        let b = 63 - self.0[w].leading_zeros();
        self.0[w] &= !(1 << b);
        Some((w as u32 * 64 + b) as u8)
    }
}

/// A drained backlog gives its index memory back instead of keeping its peak.
fn give_back<E>(q: &mut VecDeque<E>, kept: usize) {
    let capacity = q.capacity();
    if capacity > kept && q.len() < capacity / 4 {
        q.shrink_to(capacity / 2);
    }
}

#[cfg(test)]
impl<E: Sequenced> Ready<E> {
    /// Every entry's (level, seq), in the order they would be handed out.
    pub fn in_order(&self) -> Vec<(u8, Seq)> {
        let mut out = Vec::new();
        for p in self.levels() {
            let q = match self {
                Ready::Plain(q) => q,
                Ready::Levels(l) => l.fifo(p).expect("a non-empty level"),
            };
            out.extend(q.iter().map(|e| (p, e.seq())));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Sequenced for u64 {
        fn seq(&self) -> Seq {
            *self
        }
    }

    fn drain(r: &mut Ready<u64>) -> Vec<(u8, u64)> {
        std::iter::from_fn(|| r.pop_front().map(|(e, p)| (p, e))).collect()
    }

    #[test]
    fn higher_levels_go_first_and_each_level_in_sequence_order() {
        let mut r = Ready::new(255);
        for (seq, p) in [(0, 0), (1, 9), (2, 255), (3, 0), (4, 9), (5, 64), (6, 63)] {
            r.push_back(seq, p);
        }
        assert_eq!(r.len(), 7);
        assert_eq!(r.front(), Some(&2));
        assert_eq!(r.levels().collect::<Vec<_>>(), [255, 64, 63, 9, 0]);
        assert_eq!(
            (r.lowest(), r.front_at(9), r.back_at(9)),
            (Some(0), Some(&1), Some(&4))
        );
        assert_eq!(r.back_at(7), None, "a level never used is empty");
        assert_eq!(
            drain(&mut r),
            [(255, 2), (64, 5), (63, 6), (9, 1), (9, 4), (0, 0), (0, 3)]
        );
        assert_eq!((r.len(), r.front(), r.lowest()), (0, None, None));
    }

    #[test]
    fn an_entry_coming_back_goes_before_the_younger_ones_of_its_level() {
        let mut r = Ready::new(3);
        for (seq, p) in [(1, 1), (3, 1), (4, 2), (5, 1)] {
            r.push_back(seq, p);
        }
        r.insert(0, 1); // requeued, oldest of its level
        r.insert(2, 1); // between 1 and 3
        r.insert(6, 2); // newest: appended
        assert_eq!(
            r.in_order(),
            [(2, 4), (2, 6), (1, 0), (1, 1), (1, 2), (1, 3), (1, 5)]
        );
    }

    #[test]
    fn entries_are_found_and_taken_out_by_sequence_number_in_any_level() {
        let mut r = Ready::new(7);
        for (seq, p) in [(0, 0), (1, 7), (2, 3), (3, 7)] {
            r.push_back(seq, p);
        }
        *r.get_mut(2).unwrap() = 2; // found in level 3
        assert!(r.get_mut(9).is_none());
        assert_eq!(r.remove(1), Some(1));
        assert_eq!(r.remove(1), None);
        assert_eq!(r.pop_back_if(0), Some(0), "the newest of level 0");
        assert_eq!(r.pop_back_if(2), Some(2));
        assert_eq!(r.in_order(), [(7, 3)]);
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), [3]);
        assert_eq!(r.pop_front_at(7), Some(3));
        assert_eq!((r.len(), r.levels().next()), (0, None));
    }

    #[test]
    fn a_plain_list_is_one_fifo_at_level_0() {
        let mut r = Ready::new(0);
        assert!(matches!(r, Ready::Plain(_)));
        r.push_back(1, 0);
        r.insert(0, 0);
        r.push_back(2, 0);
        assert_eq!(r.levels().collect::<Vec<_>>(), [0]);
        assert_eq!(r.remove(1), Some(1));
        assert_eq!(drain(&mut r), [(0, 0), (0, 2)]);
        assert_eq!(r.levels().next(), None);
    }

    #[test]
    fn a_drained_level_gives_its_memory_back() {
        let mut r = Ready::new(1);
        for seq in 0..10_000 {
            r.push_back(seq, 1);
        }
        for _ in 0..9_990 {
            r.pop_front();
        }
        let Ready::Levels(l) = &r else { panic!() };
        let capacity = l.fifo(1).unwrap().capacity();
        assert!(capacity < 1_000, "kept {capacity} slots for 10 entries");
    }
}
