//! A message as a queue holds it, and the shard's payload cache budget.
//!
//! Contract: owned by one shard (`Rc`, `Cell`). A `Stored` always knows its envelope and length;
//! its payload (the producer's exact bytes) is in memory or, once its journal record is durable
//! and the shard is over `cache_bytes_max`, only in the journal, from which the shard reads it
//! back when it is delivered. Every payload held in memory is counted in the shard's `Cache`
//! from the moment it is stored until it is dropped or cooled (`Drop` keeps the count right
//! whoever drops the last reference), so the shard's memory is bounded by the budget, not by its
//! backlog. Transient payloads cannot turn cold; a publish that would take them past the budget
//! is refused. Journaled payloads keep at most half the budget in memory (the head of each
//! backlog, delivered first), so transient ones always have the other half.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;

use crate::storage::Position;

/// The shard's count of payload bytes in memory, against its budget.
#[derive(Debug)]
pub struct Cache {
    bytes: Cell<u64>,
    max: u64,
}

impl Cache {
    pub fn new(max: u64) -> Rc<Cache> {
        Rc::new(Cache {
            bytes: Cell::new(0),
            max,
        })
    }

    /// The budget.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Bytes of payloads in memory now.
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    /// Whether journaled payloads should give up memory: they may use half the budget, because
    /// they can be read back from the journal while transient payloads cannot, and must always
    /// find room.
    pub fn over_journaled_share(&self) -> bool {
        self.bytes.get() > self.max / 2
    }

    /// Whether `len` more bytes fit the budget.
    pub fn has_room(&self, len: u64) -> bool {
        self.bytes.get() + len <= self.max
    }

    fn add(&self, len: u64) {
        self.bytes.set(self.bytes.get() + len);
    }

    fn sub(&self, len: u64) {
        let now = self.bytes.get();
        assert!(now >= len, "payload cache underflow: {now} - {len}");
        self.bytes.set(now - len);
    }
}

/// How many messages each journal segment still holds for the queues: a segment whose count is
/// zero (and every older one's) can be reclaimed. A message counts from the moment its record
/// has a position until its `Stored` is dropped (settled, or its queue deleted), so the count is
/// never too low: a segment is never reclaimed under a message that still needs it.
#[derive(Debug, Default)]
pub struct Liveness {
    by_segment: RefCell<BTreeMap<u32, u64>>,
}

impl Liveness {
    pub fn new() -> Rc<Liveness> {
        Rc::new(Liveness::default())
    }

    /// Messages still held in `segment`.
    pub fn live_in(&self, segment: u32) -> u64 {
        self.by_segment.borrow().get(&segment).copied().unwrap_or(0)
    }

    pub(crate) fn add(&self, segment: u32) {
        *self.by_segment.borrow_mut().entry(segment).or_insert(0) += 1;
    }

    pub(crate) fn sub(&self, segment: u32) {
        let mut map = self.by_segment.borrow_mut();
        let n = map
            .get_mut(&segment)
            .expect("a live message's segment is counted");
        assert!(*n > 0, "segment {segment} liveness underflow");
        *n -= 1;
        if *n == 0 {
            map.remove(&segment);
        }
    }
}

/// What a queue entry holds for its message.
#[derive(Clone, Debug)]
pub enum MsgRef {
    /// In memory: the shared `Stored` (payload and envelope).
    Hot(Rc<Stored>),
    /// Only in the journal, where its record holds the envelope and the payload: no allocation
    /// per message. Counted in `Liveness` explicitly (it has no destructor to do it).
    Cold { position: Position, record_len: u32 },
}

impl MsgRef {
    /// Whether its settlement must be journaled.
    pub fn journaled(&self) -> bool {
        match self {
            MsgRef::Hot(s) => s.journaled,
            MsgRef::Cold { .. } => true,
        }
    }

    /// The segment a cold message holds.
    pub fn cold_segment(&self) -> Option<u32> {
        match self {
            MsgRef::Hot(_) => None,
            MsgRef::Cold { position, .. } => Some(position.segment()),
        }
    }
}

#[derive(Debug)]
pub struct Stored {
    payload: Bytes,
    len: u32,
    pub exchange: String,
    pub routing_key: String,
    /// Its dead-letter history (`broker::deaths`), if it is a dead letter.
    pub deaths: Option<Bytes>,
    /// In the journal (a persistent message in a durable queue): its settlement is journaled too.
    pub journaled: bool,
    /// Where its journal record is, and the record's length, once appended.
    position: Cell<Option<(Position, u32)>>,
    cache: Option<Rc<Cache>>,
    /// The account that counts this message in its record's segment, once it has a position.
    live: RefCell<Option<Rc<Liveness>>>,
    /// The message's own `priority` (each priority queue caps it at its `priority_max`).
    pub priority: u8,
}

impl Stored {
    /// A message received now, its payload in memory and counted in `cache`.
    pub fn new(
        bytes: Bytes,
        exchange: String,
        routing_key: String,
        journaled: bool,
        cache: Option<&Rc<Cache>>,
    ) -> Stored {
        let len = bytes.len() as u32;
        if let Some(c) = cache {
            c.add(u64::from(len));
        }
        Stored {
            payload: bytes,
            len,
            exchange,
            routing_key,
            deaths: None,
            journaled,
            position: Cell::new(None),
            cache: cache.cloned(),
            live: RefCell::new(None),
            priority: 0,
        }
    }

    /// The same message, of `priority` (read off the message where it was verified).
    pub fn with_priority(mut self, priority: u8) -> Stored {
        self.priority = priority;
        self
    }

    /// Length of the message bytes.
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The payload (a reference count, not a copy).
    pub fn payload(&self) -> Bytes {
        self.payload.clone()
    }

    /// Where to read the payload back from, if it is journaled.
    pub fn position(&self) -> Option<(Position, u32)> {
        self.position.get()
    }

    /// Records where the message's journal record is, and counts it in that segment.
    pub fn set_position(&self, position: Position, record_len: u32, live: Option<&Rc<Liveness>>) {
        assert!(self.position.get().is_none(), "a message is journaled once");
        self.position.set(Some((position, record_len)));
        if let Some(live) = live {
            live.add(position.segment());
            *self.live.borrow_mut() = Some(live.clone());
        }
    }
}

impl Drop for Stored {
    fn drop(&mut self) {
        if let Some(c) = &self.cache {
            c.sub(u64::from(self.len));
        }
        if let (Some(live), Some((position, _))) = (self.live.get_mut().take(), self.position.get())
        {
            live.sub(position.segment());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_and_the_liveness_count_a_message_until_it_is_dropped() {
        let cache = Cache::new(10);
        let live = Liveness::new();
        let a = Stored::new(
            Bytes::from_static(b"123456"),
            String::new(),
            "q".into(),
            true,
            Some(&cache),
        );
        let b = Stored::new(
            Bytes::from_static(b"789012"),
            String::new(),
            "q".into(),
            false,
            Some(&cache),
        );
        assert_eq!(cache.bytes(), 12);
        assert!(!cache.has_room(0), "12 bytes held against a budget of 10");
        a.set_position(Position::new(3, 4096), 40, Some(&live));
        assert_eq!(live.live_in(3), 1);
        drop(a);
        assert_eq!((cache.bytes(), live.live_in(3)), (6, 0));
        drop(b);
        assert_eq!(cache.bytes(), 0);
    }
}
