//! Taking and applying what crosses cores: the changes the control-plane writer sends every
//! shard's copy, and the snapshot a copy starts from (the values themselves are `mesh::msg`'s
//! `RoutingChange` and `RoutingSnapshot`).
//!
//! Contract: built on the writer's thread and applied on the copy's. A table is not `Send`, so a copy never shares the writer's names:
//! it is rebuilt from a `RoutingSnapshot` by the same `declare_exchange` and `bind` the writer
//! ran, into names of its own thread. The snapshot lists bindings in replay order, not sorted,
//! so the rebuilt matchers hold their queue lists in the writer's order and the copy routes
//! every key to the same queues in the same order. Faults handled: a snapshot the table refuses
//! (it cannot, being taken from a table) leaves the copy as it was and returns the refusal.

use std::collections::{BTreeMap, BTreeSet};

use super::error::RoutingError;
use super::intern::{QueueId, Queues};
use super::matcher::Matcher;
use super::table::{Exchange, RoutingTable};
use crate::mesh::msg::RoutingSnapshot;
use crate::mesh::types::Binding;

impl RoutingTable {
    /// The table as values another thread can rebuild it from (`RoutingChange::Snapshot`).
    pub fn snapshot(&self) -> RoutingSnapshot {
        let mut names: Vec<&String> = self.exchanges.keys().collect();
        names.sort_unstable();
        let mut snapshot = RoutingSnapshot {
            exchanges: Vec::with_capacity(names.len()),
            bindings: Vec::with_capacity(self.binding_count()),
        };
        for name in names {
            let e = &self.exchanges[name];
            snapshot.exchanges.push(e.decl.clone());
            replay_order(name, e, &self.queues, &mut snapshot.bindings);
        }
        snapshot
    }

    /// A table in the state `snapshot` was taken of, its names this thread's own.
    pub(super) fn from_snapshot(snapshot: RoutingSnapshot) -> Result<RoutingTable, RoutingError> {
        let mut table = RoutingTable::new();
        for decl in snapshot.exchanges {
            table.declare_exchange(decl)?;
        }
        for binding in snapshot.bindings {
            table.bind(binding)?;
        }
        Ok(table)
    }
}

/// Appends the bindings of exchange `name` in an order whose replay by `bind` rebuilds each of
/// its matcher's queue lists in their present order. A sorted listing would not: a list keeps
/// the order its entries arrived in, net of removals (a fanout queue keeps the place its first
/// binding gave it after that binding goes), and a route emits in that order.
fn replay_order(name: &str, e: &Exchange, queues: &Queues, out: &mut Vec<Binding>) {
    let binding = |queue: &str, key: &str, durable: bool| Binding {
        exchange: name.to_owned(),
        queue: queue.to_owned(),
        key: key.to_owned(),
        durable,
    };
    let keys_of = |id: QueueId| {
        let queue = queues.name(id);
        (queue, &e.bindings[queue].keys)
    };
    match &e.matcher {
        // A list per key, an entry per binding. Keys are sorted only so that a snapshot does
        // not vary with the table's hash seed.
        Matcher::Direct(by_key) => {
            let mut lists: Vec<_> = by_key.iter().collect();
            lists.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (key, ids) in lists {
                for id in ids.iter() {
                    let (queue, keys) = keys_of(id);
                    out.push(binding(queue, key, keys[&**key]));
                }
            }
        }
        // One list, an entry per queue.
        Matcher::Fanout(ids) => {
            for &id in ids {
                let (queue, keys) = keys_of(id);
                out.extend(keys.iter().map(|(key, &d)| binding(queue, key, d)));
            }
        }
        // A list per node, an entry per binding ending there. One queue's bindings that end on
        // one node (`#` and `#.#`) are interchangeable: the list holds only the queue.
        Matcher::Topic(trie) => {
            let mut ending: BTreeMap<(u32, QueueId), Vec<(&str, bool)>> = BTreeMap::new();
            for qb in e.bindings.values() {
                for (key, &durable) in &qb.keys {
                    let node = trie
                        .node_of(key)
                        .expect("a topic binding's path is in the trie");
                    ending
                        .entry((node, qb.id))
                        .or_default()
                        .push((key.as_str(), durable));
                }
            }
            let nodes: BTreeSet<u32> = ending.keys().map(|&(node, _)| node).collect();
            for node in nodes {
                for id in trie.queues_at(node) {
                    let (key, durable) = ending
                        .get_mut(&(node, id))
                        .and_then(Vec::pop)
                        .expect("a node's queue has a binding ending there");
                    out.push(binding(queues.name(id), key, durable));
                }
            }
        }
    }
}
