//! Name interning for one routing table: the queues bound anywhere, and each topic trie's
//! binding-key words, each held once and named by a small id.
//!
//! Contract: owned by one table on one thread. A name is an `Rc<str>` shared only among that
//! table's own maps, so interning costs no atomic and the table cannot leave its thread (a copy
//! on another core is rebuilt from a `RoutingSnapshot`, with names of its own). An id lives while
//! something uses its name and is reused after, so a table holds no more slots than live names
//! (plus freed ones awaiting reuse). Faults handled: none arise; more than `WORD_ID_MAX` distinct
//! words in one trie is a panic, as those ids could not be told from the trie's markers.

use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

use super::hash::Seeded;

/// A name interned by one table.
pub(super) type Name = Rc<str>;

/// A queue's index in `Queues::slots`: the matchers hold these, not names, so a route returns a
/// borrowed name and a topic route dedupes with a stamp per id.
pub(super) type QueueId = u32;

/// Word ids stay below the trie's `VIA_*` markers.
const WORD_ID_MAX: u32 = u32::MAX - 4;

/// The queues bound anywhere. A slot lives while some exchange binds its queue.
#[derive(Clone, Debug, Default)]
pub(super) struct Queues {
    pub(super) ids: HashMap<Name, QueueId>,
    pub(super) slots: Vec<QueueSlot>,
    free: Vec<QueueId>,
}

#[derive(Clone, Debug)]
pub(super) struct QueueSlot {
    name: Name,
    /// The exchanges with at least one binding to this queue: `remove_queue` visits only these.
    pub(super) exchanges: BTreeSet<String>,
}

impl Queues {
    /// The queue's id, creating its slot if needed, and records that `exchange` binds it.
    pub(super) fn bind(&mut self, queue: &str, exchange: &str) -> (QueueId, Name) {
        let id = match self.ids.get(queue) {
            Some(&id) => id,
            None => {
                let name: Name = Rc::from(queue);
                let slot = QueueSlot {
                    name: name.clone(),
                    exchanges: BTreeSet::new(),
                };
                let id = match self.free.pop() {
                    Some(id) => {
                        self.slots[id as usize] = slot;
                        id
                    }
                    None => {
                        self.slots.push(slot);
                        (self.slots.len() - 1) as QueueId
                    }
                };
                self.ids.insert(name, id);
                id
            }
        };
        let slot = &mut self.slots[id as usize];
        if !slot.exchanges.contains(exchange) {
            slot.exchanges.insert(exchange.to_owned());
        }
        (id, slot.name.clone())
    }

    /// `exchange` no longer binds the queue; its slot goes with its last exchange.
    pub(super) fn unbind(&mut self, id: QueueId, exchange: &str) {
        let slot = &mut self.slots[id as usize];
        slot.exchanges.remove(exchange);
        if slot.exchanges.is_empty() {
            self.release(id);
        }
    }

    pub(super) fn release(&mut self, id: QueueId) {
        let slot = &mut self.slots[id as usize];
        self.ids.remove(&*slot.name);
        slot.name = Rc::from("");
        slot.exchanges = BTreeSet::new();
        self.free.push(id);
    }

    #[inline]
    pub(super) fn name(&self, id: QueueId) -> &str {
        &self.slots[id as usize].name
    }
}

/// One topic trie's literal binding-key words, so a route hashes each routing-key word once and
/// each literal step looks up a word id, not a string. A word lives while some edge uses it.
#[derive(Clone, Debug, Default)]
pub(super) struct Words {
    ids: HashMap<Name, u32, Seeded>,
    /// Word id → (the word, how many edges use it).
    word_of: Vec<(Name, u32)>,
    free: Vec<u32>,
}

impl Words {
    #[inline]
    pub(super) fn get(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    /// The word's id, interning it with no uses yet if it is new.
    pub(super) fn intern(&mut self, word: &str) -> u32 {
        if let Some(id) = self.get(word) {
            return id;
        }
        let word: Name = Rc::from(word);
        let id = match self.free.pop() {
            Some(id) => {
                self.word_of[id as usize] = (word.clone(), 0);
                id
            }
            None => {
                self.word_of.push((word.clone(), 0));
                (self.word_of.len() - 1) as u32
            }
        };
        assert!(id <= WORD_ID_MAX, "more distinct topic words than u32 ids");
        self.ids.insert(word, id);
        id
    }

    /// One more edge uses the word.
    pub(super) fn add_use(&mut self, id: u32) {
        self.word_of[id as usize].1 += 1;
    }

    /// One edge less uses the word; it goes with its last.
    pub(super) fn drop_use(&mut self, id: u32) {
        let uses = &mut self.word_of[id as usize];
        uses.1 -= 1;
        if uses.1 == 0 {
            self.ids.remove(&*uses.0);
            uses.0 = Rc::from("");
            self.free.push(id);
        }
    }

    /// How many words are interned.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }
}
