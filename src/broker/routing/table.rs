//! The routing table: every exchange with its bindings, the changes to them, and the queues a
//! routing key reaches.
//!
//! Contract: plain data without I/O, owned by one thread and never shared across threads (its
//! names are that thread's `Rc<str>`s, so it is not `Send`). Two owners hold one: the
//! control-plane writer (shard 0), whose table is authoritative and validates every change, and
//! every shard's copy, which that shard's publishes are routed by without a hop and which changes
//! only by `apply`ing the writer's `RoutingChange`s in the writer's order. Both run this same
//! code, so a copy reaches exactly the writer's state: nothing here depends on a hash map's
//! iteration order, and an auto-delete exchange goes inside the change that removed its last
//! binding, on every copy alike. The table owns exchange declarations and bindings, not queues:
//! whether a queue exists, and where, is the caller's to know; `remove_queue` is how a queue's
//! deletion arrives. `route` is the publish path and allocates nothing.
//!
//! Faults handled: every refused change is a `RoutingError` (the schema's error code and a
//! sentence naming the exchange) and changes nothing. The default exchange `""` is not in the
//! table (the broker routes it by queue name), so declaring, deleting or binding it is refused;
//! so is declaring a name under the reserved prefix `weir.`, and a binding that names no queue;
//! a redeclare with other properties names each difference.

use std::collections::{BTreeMap, HashMap};

use weir_protocol::wire::ErrorCode;

use super::decl::Removed;
use super::error::{describe, differences, not_found, refuse, refuse_default, RoutingError};
use super::hash::Seeded;
use super::intern::{Name, QueueId, Queues};
use super::matcher::Matcher;
use crate::mesh::msg::RoutingChange;
use crate::mesh::types::{Binding, ExchangeDecl};

/// Names under this prefix belong to the broker.
pub const RESERVED_PREFIX: &str = "weir.";

/// Every exchange with its bindings.
#[derive(Clone, Debug, Default)]
pub struct RoutingTable {
    pub(super) exchanges: HashMap<String, Exchange, Seeded>,
    pub(super) queues: Queues,
    binding_count: usize,
}

#[derive(Clone, Debug)]
pub(super) struct Exchange {
    pub(super) decl: ExchangeDecl,
    /// Queue → binding key → durable. Ordered, so listings need no sort and removal order (and
    /// with it every copy's state) is the same everywhere.
    pub(super) bindings: BTreeMap<Name, QueueBindings>,
    binding_count: usize,
    pub(super) matcher: Matcher,
}

#[derive(Clone, Debug)]
pub(super) struct QueueBindings {
    pub(super) id: QueueId,
    pub(super) keys: BTreeMap<String, bool>,
}

impl RoutingTable {
    pub fn new() -> RoutingTable {
        RoutingTable::default()
    }

    /// Creates an exchange (`Ok(true)`), or checks that an identical one exists (`Ok(false)`).
    pub fn declare_exchange(&mut self, decl: ExchangeDecl) -> Result<bool, RoutingError> {
        refuse_default(&decl.name, "declared")?;
        if let Some(existing) = self.exchanges.get(&decl.name) {
            let asks = differences(&existing.decl, &decl);
            if asks.is_empty() {
                return Ok(false);
            }
            return refuse(
                ErrorCode::PreconditionFailed,
                format!(
                    "exchange '{}' exists as a {}; this declare asks for {}",
                    decl.name,
                    describe(&existing.decl),
                    asks.join(", ")
                ),
            );
        }
        if decl.name.starts_with(RESERVED_PREFIX) {
            return refuse(
                ErrorCode::AccessRefused,
                format!(
                    "exchange '{}': names starting with '{RESERVED_PREFIX}' are reserved for the broker",
                    decl.name
                ),
            );
        }
        let exchange = Exchange {
            matcher: Matcher::new(decl.kind),
            decl,
            bindings: BTreeMap::new(),
            binding_count: 0,
        };
        self.exchanges.insert(exchange.decl.name.clone(), exchange);
        Ok(true)
    }

    /// The exchange's declaration, if it exists (a passive declare).
    pub fn exchange(&self, name: &str) -> Option<&ExchangeDecl> {
        self.exchanges.get(name).map(|e| &e.decl)
    }

    /// Deletes an exchange and its bindings; `if_unused` refuses while it has any.
    pub fn delete_exchange(
        &mut self,
        name: &str,
        if_unused: bool,
    ) -> Result<Removed, RoutingError> {
        refuse_default(name, "deleted")?;
        let exchange = self.exchanges.get(name).ok_or_else(|| not_found(name))?;
        if if_unused && exchange.binding_count > 0 {
            let n = exchange.binding_count;
            return refuse(
                ErrorCode::PreconditionFailed,
                format!(
                    "exchange '{name}' has {n} binding{}",
                    if n == 1 { "" } else { "s" }
                ),
            );
        }
        let exchange = self.exchanges.remove(name).expect("looked up above");
        let mut removed = Removed::default();
        for (queue, qb) in &exchange.bindings {
            for (key, &durable) in &qb.keys {
                removed.bindings.push(Binding {
                    exchange: name.to_owned(),
                    queue: queue.to_string(),
                    key: key.clone(),
                    durable,
                });
            }
            self.queues.unbind(qb.id, name);
        }
        self.binding_count -= exchange.binding_count;
        removed.exchanges.push(name.to_owned());
        Ok(removed)
    }

    /// Adds a binding: `Ok(true)` if new, `Ok(false)` if it existed (its `durable` is updated).
    pub fn bind(&mut self, binding: Binding) -> Result<bool, RoutingError> {
        refuse_default(&binding.exchange, "bound")?;
        if binding.queue.is_empty() {
            return refuse(
                ErrorCode::InvalidArgument,
                format!(
                    "a binding to exchange '{}' must name a queue",
                    binding.exchange
                ),
            );
        }
        let exchange = self
            .exchanges
            .get_mut(&binding.exchange)
            .ok_or_else(|| not_found(&binding.exchange))?;
        let first = match exchange.bindings.get_mut(binding.queue.as_str()) {
            Some(qb) => {
                if let Some(durable) = qb.keys.get_mut(&binding.key) {
                    *durable = binding.durable;
                    return Ok(false);
                }
                qb.keys.insert(binding.key.clone(), binding.durable);
                exchange.matcher.add(&binding.key, qb.id, false);
                false
            }
            None => true,
        };
        if first {
            let (id, name) = self.queues.bind(&binding.queue, &binding.exchange);
            let keys = BTreeMap::from([(binding.key.clone(), binding.durable)]);
            exchange.bindings.insert(name, QueueBindings { id, keys });
            exchange.matcher.add(&binding.key, id, true);
        }
        exchange.binding_count += 1;
        self.binding_count += 1;
        Ok(true)
    }

    /// Removes a binding; one that does not exist is not an error (nothing is removed).
    pub fn unbind(&mut self, binding: &Binding) -> Result<Removed, RoutingError> {
        refuse_default(&binding.exchange, "unbound")?;
        let exchange = self
            .exchanges
            .get_mut(&binding.exchange)
            .ok_or_else(|| not_found(&binding.exchange))?;
        let mut removed = Removed::default();
        let Some(qb) = exchange.bindings.get_mut(binding.queue.as_str()) else {
            return Ok(removed);
        };
        let Some(durable) = qb.keys.remove(&binding.key) else {
            return Ok(removed);
        };
        let id = qb.id;
        let last = qb.keys.is_empty();
        if last {
            exchange.bindings.remove(binding.queue.as_str());
            self.queues.unbind(id, &binding.exchange);
        }
        exchange.matcher.remove(&binding.key, id, last);
        exchange.binding_count -= 1;
        self.binding_count -= 1;
        removed.bindings.push(Binding {
            durable,
            ..binding.clone()
        });
        self.auto_delete(&binding.exchange, &mut removed);
        Ok(removed)
    }

    /// An auto-delete exchange goes when its last binding does.
    fn auto_delete(&mut self, name: &str, removed: &mut Removed) {
        if self
            .exchanges
            .get(name)
            .is_some_and(|e| e.decl.auto_delete && e.binding_count == 0)
        {
            self.exchanges.remove(name);
            removed.exchanges.push(name.to_owned());
        }
    }

    /// Removes every binding to `queue` (it was deleted), auto-deleting exchanges as `unbind`.
    pub fn remove_queue(&mut self, queue: &str) -> Removed {
        let mut removed = Removed::default();
        let Some(&id) = self.queues.ids.get(queue) else {
            return removed;
        };
        let exchanges = std::mem::take(&mut self.queues.slots[id as usize].exchanges);
        for name in &exchanges {
            let exchange = self
                .exchanges
                .get_mut(name)
                .expect("a queue's exchanges exist");
            let qb = exchange
                .bindings
                .remove(queue)
                .expect("a queue's exchanges bind it");
            let n = qb.keys.len();
            for (i, (key, durable)) in qb.keys.into_iter().enumerate() {
                exchange.matcher.remove(&key, id, i + 1 == n);
                removed.bindings.push(Binding {
                    exchange: name.clone(),
                    queue: queue.to_owned(),
                    key,
                    durable,
                });
            }
            exchange.binding_count -= n;
            self.binding_count -= n;
            self.auto_delete(name, &mut removed);
        }
        self.queues.release(id);
        removed
    }

    /// Applies a change the writer has already validated and applied, with the same result.
    pub fn apply(&mut self, change: RoutingChange) -> Result<Removed, RoutingError> {
        match change {
            RoutingChange::DeclareExchange(decl) => {
                self.declare_exchange(decl)?;
                Ok(Removed::default())
            }
            RoutingChange::DeleteExchange(name) => self.delete_exchange(&name, false),
            RoutingChange::Bind(binding) => {
                self.bind(binding)?;
                Ok(Removed::default())
            }
            RoutingChange::Unbind(binding) => self.unbind(&binding),
            RoutingChange::RemoveQueue(queue) => Ok(self.remove_queue(&queue)),
            RoutingChange::Snapshot(snapshot) => {
                *self = RoutingTable::from_snapshot(snapshot)?;
                Ok(Removed::default())
            }
        }
    }

    /// Appends the queues `routing_key` reaches through `exchange` to `out`, each once, in an
    /// order that depends only on the changes the table has seen.
    pub fn route<'a>(
        &'a self,
        exchange: &str,
        routing_key: &str,
        out: &mut Vec<&'a str>,
    ) -> Result<(), RoutingError> {
        let exchange = self
            .exchanges
            .get(exchange)
            .ok_or_else(|| not_found(exchange))?;
        let queues = &self.queues;
        match &exchange.matcher {
            Matcher::Direct(by_key) => {
                if let Some(ids) = by_key.get(routing_key) {
                    out.push(queues.name(ids.first));
                    out.extend(ids.more.iter().map(|&q| queues.name(q)));
                }
            }
            Matcher::Fanout(ids) => out.extend(ids.iter().map(|&q| queues.name(q))),
            Matcher::Topic(trie) => trie.route(routing_key, queues.slots.len(), |q| {
                out.push(queues.name(q))
            }),
        }
        Ok(())
    }

    /// Every exchange in name order, with its binding count.
    pub fn exchanges(&self) -> Vec<(&ExchangeDecl, usize)> {
        let mut all: Vec<_> = self
            .exchanges
            .values()
            .map(|e| (&e.decl, e.binding_count))
            .collect();
        all.sort_unstable_by(|a, b| a.0.name.cmp(&b.0.name));
        all
    }

    /// Bindings, optionally only from one exchange and/or to one queue, sorted by (exchange,
    /// queue, key).
    pub fn bindings(&self, exchange: Option<&str>, queue: Option<&str>) -> Vec<Binding> {
        let mut out = Vec::new();
        let mut from = |name: &str, e: &Exchange| {
            let mut push = |q: &str, qb: &QueueBindings| {
                for (key, &durable) in &qb.keys {
                    out.push(Binding {
                        exchange: name.to_owned(),
                        queue: q.to_owned(),
                        key: key.clone(),
                        durable,
                    });
                }
            };
            match queue {
                Some(q) => {
                    if let Some(qb) = e.bindings.get(q) {
                        push(q, qb);
                    }
                }
                None => e.bindings.iter().for_each(|(q, qb)| push(q, qb)),
            }
        };
        match (exchange, queue) {
            (Some(name), _) => {
                if let Some(e) = self.exchanges.get(name) {
                    from(name, e);
                }
            }
            (None, Some(q)) => {
                if let Some(&id) = self.queues.ids.get(q) {
                    for name in &self.queues.slots[id as usize].exchanges {
                        from(name, &self.exchanges[name]);
                    }
                }
            }
            (None, None) => {
                let mut names: Vec<&String> = self.exchanges.keys().collect();
                names.sort_unstable();
                for name in names {
                    from(name, &self.exchanges[name]);
                }
            }
        }
        out
    }

    /// Whether any binding names `queue`.
    pub fn has_bindings_to(&self, queue: &str) -> bool {
        self.queues.ids.contains_key(queue)
    }

    /// What must survive a restart: the durable exchanges in name order, and the durable
    /// bindings (a binding flagged durable on a transient exchange could not be restored, so
    /// it is left out too).
    pub fn durable_state(&self) -> (Vec<ExchangeDecl>, Vec<Binding>) {
        let mut names: Vec<&String> = self
            .exchanges
            .iter()
            .filter(|(_, e)| e.decl.durable)
            .map(|(name, _)| name)
            .collect();
        names.sort_unstable();
        let mut exchanges = Vec::with_capacity(names.len());
        let mut bindings = Vec::new();
        for name in names {
            let e = &self.exchanges[name];
            exchanges.push(e.decl.clone());
            for (queue, qb) in &e.bindings {
                for (key, _) in qb.keys.iter().filter(|(_, durable)| **durable) {
                    bindings.push(Binding {
                        exchange: name.clone(),
                        queue: queue.to_string(),
                        key: key.clone(),
                        durable: true,
                    });
                }
            }
        }
        (exchanges, bindings)
    }

    pub fn exchange_count(&self) -> usize {
        self.exchanges.len()
    }

    pub fn binding_count(&self) -> usize {
        self.binding_count
    }
}
