//! An exchange's matcher: which of its bound queues a routing key reaches, by exchange kind.
//!
//! Contract: owned by one exchange of one table, on that table's thread; holds queue ids, never
//! names. Direct is one hash lookup of the routing key, fanout one list, topic the trie. Every
//! queue list keeps the order its entries arrived in, net of removals, so a route's order depends
//! only on the changes the table has seen. Faults handled: none; the table validates every change
//! before it reaches here.

use std::collections::HashMap;

use super::decl::ExchangeKind;
use super::hash::Seeded;
use super::intern::QueueId;
use super::trie::TopicTrie;

#[derive(Clone, Debug)]
pub(super) enum Matcher {
    /// Binding key → the queues bound with it (each once: a binding's identity includes its key).
    Direct(HashMap<Box<str>, DirectQueues, Seeded>),
    Topic(TopicTrie),
    /// Each bound queue once, however many keys bind it.
    Fanout(Vec<QueueId>),
}

/// A direct binding key's queues. Most keys bind one queue: it is held inline, sparing a route
/// one cache miss.
#[derive(Clone, Debug)]
pub(super) struct DirectQueues {
    pub(super) first: QueueId,
    pub(super) more: Vec<QueueId>,
}

impl DirectQueues {
    /// In the order a route emits them.
    pub(super) fn iter(&self) -> impl Iterator<Item = QueueId> + '_ {
        std::iter::once(self.first).chain(self.more.iter().copied())
    }
}

impl Matcher {
    pub(super) fn new(kind: ExchangeKind) -> Matcher {
        match kind {
            ExchangeKind::Direct => Matcher::Direct(HashMap::default()),
            ExchangeKind::Topic => Matcher::Topic(TopicTrie::new()),
            ExchangeKind::Fanout => Matcher::Fanout(Vec::new()),
        }
    }

    /// `first`: the queue had no binding from this exchange before.
    pub(super) fn add(&mut self, key: &str, queue: QueueId, first: bool) {
        match self {
            Matcher::Direct(by_key) => match by_key.get_mut(key) {
                Some(queues) => queues.more.push(queue),
                None => {
                    let queues = DirectQueues {
                        first: queue,
                        more: Vec::new(),
                    };
                    by_key.insert(key.into(), queues);
                }
            },
            Matcher::Topic(trie) => trie.insert(key, queue),
            Matcher::Fanout(queues) => {
                if first {
                    queues.push(queue);
                }
            }
        }
    }

    /// `last`: the queue has no binding from this exchange left.
    pub(super) fn remove(&mut self, key: &str, queue: QueueId, last: bool) {
        match self {
            Matcher::Direct(by_key) => {
                if let Some(queues) = by_key.get_mut(key) {
                    if queues.first != queue {
                        if let Some(i) = queues.more.iter().position(|&q| q == queue) {
                            queues.more.remove(i);
                        }
                    } else if queues.more.is_empty() {
                        by_key.remove(key);
                    } else {
                        queues.first = queues.more.remove(0);
                    }
                }
            }
            Matcher::Topic(trie) => trie.remove(key, queue),
            Matcher::Fanout(queues) => {
                if last {
                    if let Some(i) = queues.iter().position(|&q| q == queue) {
                        queues.remove(i);
                    }
                }
            }
        }
    }
}
