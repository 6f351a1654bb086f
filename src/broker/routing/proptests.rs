//! Property tests of the routing table: the trie against the reference matcher, and a copy fed
//! the writer's changes (snapshots included) against the writer and a plain model.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use weir_protocol::wire::ErrorCode;

use super::tests::{binding, decl};
use super::*;
use crate::mesh::msg::RoutingChange;
use crate::mesh::types::{Binding, ExchangeDecl};

fn word() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "", "*", "#"])
}

fn key_word() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", ""])
}

fn joined(words: impl Strategy<Value = &'static str>) -> impl Strategy<Value = String> {
    prop::collection::vec(words, 0..5).prop_map(|w| w.join("."))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// The trie routes exactly as the reference matcher says, each queue once.
    #[test]
    fn the_trie_agrees_with_the_reference(
        bindings in prop::collection::vec((0..6u8, joined(word())), 0..30),
        keys in prop::collection::vec(joined(key_word()), 1..8),
    ) {
        let mut t = RoutingTable::new();
        t.declare_exchange(decl("x", ExchangeKind::Topic, false, false)).unwrap();
        for (q, pattern) in &bindings {
            t.bind(binding("x", &format!("q{q}"), pattern, false)).unwrap();
        }
        for key in &keys {
            let mut out = Vec::new();
            t.route("x", key, &mut out).unwrap();
            let got: BTreeSet<&str> = out.iter().copied().collect();
            prop_assert_eq!(got.len(), out.len(), "duplicates for '{}': {:?}", key, out);
            let want: BTreeSet<String> = bindings
                .iter()
                .filter(|(_, p)| topic_matches(p, key))
                .map(|(q, _)| format!("q{q}"))
                .collect();
            let got: BTreeSet<String> = got.into_iter().map(String::from).collect();
            prop_assert_eq!(got, want, "key '{}'", key);
        }
    }

    /// A copy fed the writer's successful changes stays equal to the writer, and both equal
    /// a plain model of exchanges and bindings, routes included.
    #[test]
    fn copies_follow_the_writer_and_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut writer = RoutingTable::new();
        let mut copy = RoutingTable::new();
        let mut model = Model::default();
        for op in ops {
            let (result, change) = match op.clone() {
                Op::Declare(d) => (
                    writer.declare_exchange(d.clone()).map(|_| Removed::default()),
                    RoutingChange::DeclareExchange(d),
                ),
                Op::Delete(name, if_unused) => (
                    writer.delete_exchange(&name, if_unused),
                    RoutingChange::DeleteExchange(name),
                ),
                Op::Bind(b) => (
                    writer.bind(b.clone()).map(|_| Removed::default()),
                    RoutingChange::Bind(b),
                ),
                Op::Unbind(b) => (writer.unbind(&b), RoutingChange::Unbind(b)),
                Op::RemoveQueue(q) => (Ok(writer.remove_queue(&q)), RoutingChange::RemoveQueue(q)),
                Op::Snapshot => (Ok(Removed::default()), RoutingChange::Snapshot(writer.snapshot())),
            };
            let expected = model.apply(&op);
            prop_assert_eq!(
                result.as_ref().map_err(|e| e.code),
                expected.as_ref().map_err(|&c| c),
                "{:?}", op
            );
            if result.is_ok() {
                prop_assert_eq!(copy.apply(change), result);
            }
            prop_assert_eq!(writer.bindings(None, None), copy.bindings(None, None));
            prop_assert_eq!(writer.exchanges(), copy.exchanges());
            let model_bindings: Vec<Binding> = model
                .bindings
                .iter()
                .map(|((e, q, k), &d)| binding(e, q, k, d))
                .collect();
            prop_assert_eq!(writer.bindings(None, None), model_bindings);
            let model_exchanges: Vec<(&ExchangeDecl, usize)> = model
                .exchanges
                .values()
                .map(|d| (d, model.bindings.keys().filter(|(e, _, _)| *e == d.name).count()))
                .collect();
            prop_assert_eq!(writer.exchanges(), model_exchanges);
            prop_assert_eq!(writer.binding_count(), model.bindings.len());
            prop_assert_eq!(writer.exchange_count(), model.exchanges.len());
            for q in QUEUES {
                let bound = model.bindings.keys().any(|(_, mq, _)| mq == q);
                prop_assert_eq!(writer.has_bindings_to(q), bound);
                prop_assert_eq!(copy.has_bindings_to(q), bound);
            }
            for name in EXCHANGES {
                for key in ["a", "b", "a.b", "", "b.a.b"] {
                    let (mut w, mut c) = (Vec::new(), Vec::new());
                    let wr = writer.route(name, key, &mut w).map_err(|e| e.code);
                    let cr = copy.route(name, key, &mut c).map_err(|e| e.code);
                    prop_assert_eq!(&wr, &cr);
                    // Same changes, same order: routes are deterministic across copies.
                    prop_assert_eq!(&w, &c);
                    if wr.is_ok() {
                        w.sort_unstable();
                        prop_assert_eq!(w, model.route(name, key));
                    }
                }
            }
        }
    }
}

const EXCHANGES: [&str; 3] = ["x", "y", "z"];
const QUEUES: [&str; 3] = ["q1", "q2", "q3"];
const KEYS: [&str; 6] = ["a", "b", "a.b", "#", "*.b", ""];

#[derive(Clone, Debug)]
enum Op {
    Declare(ExchangeDecl),
    Delete(String, bool),
    Bind(Binding),
    Unbind(Binding),
    RemoveQueue(String),
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    let exchange = prop::sample::select(EXCHANGES.to_vec()).prop_map(String::from);
    let queue = prop::sample::select(QUEUES.to_vec()).prop_map(String::from);
    let key = prop::sample::select(KEYS.to_vec()).prop_map(String::from);
    let kind = prop::sample::select(vec![
        ExchangeKind::Direct,
        ExchangeKind::Topic,
        ExchangeKind::Fanout,
    ]);
    let b =
        (exchange.clone(), queue.clone(), key, any::<bool>()).prop_map(|(e, q, k, d)| Binding {
            exchange: e,
            queue: q,
            key: k,
            durable: d,
        });
    prop_oneof![
        2 => (exchange.clone(), kind, any::<bool>(), prop::bool::weighted(0.3)).prop_map(
            |(name, kind, durable, auto_delete)| Op::Declare(ExchangeDecl { name, kind, durable, auto_delete })
        ),
        1 => (exchange, any::<bool>()).prop_map(|(e, u)| Op::Delete(e, u)),
        5 => b.clone().prop_map(Op::Bind),
        3 => b.prop_map(Op::Unbind),
        1 => queue.prop_map(Op::RemoveQueue),
        1 => Just(Op::Snapshot),
    ]
}

/// Exchanges and bindings as plain ordered sets, with the rules written out again.
#[derive(Default)]
struct Model {
    exchanges: BTreeMap<String, ExchangeDecl>,
    bindings: BTreeMap<(String, String, String), bool>,
}

impl Model {
    fn count(&self, exchange: &str) -> usize {
        self.bindings
            .keys()
            .filter(|(e, _, _)| e == exchange)
            .count()
    }

    fn auto_delete(&mut self, exchange: &str) {
        if self.exchanges[exchange].auto_delete && self.count(exchange) == 0 {
            self.exchanges.remove(exchange);
        }
    }

    fn apply(&mut self, op: &Op) -> Result<Removed, ErrorCode> {
        let mut removed = Removed::default();
        match op {
            Op::Declare(d) => match self.exchanges.get(&d.name) {
                Some(existing) if existing != d => return Err(ErrorCode::PreconditionFailed),
                Some(_) => {}
                None => {
                    self.exchanges.insert(d.name.clone(), d.clone());
                }
            },
            Op::Delete(name, if_unused) => {
                if !self.exchanges.contains_key(name) {
                    return Err(ErrorCode::NotFound);
                }
                if *if_unused && self.count(name) > 0 {
                    return Err(ErrorCode::PreconditionFailed);
                }
                self.exchanges.remove(name);
                let gone: Vec<_> = self
                    .bindings
                    .iter()
                    .filter(|((e, _, _), _)| e == name)
                    .map(|((e, q, k), &d)| binding(e, q, k, d))
                    .collect();
                for b in &gone {
                    self.bindings
                        .remove(&(b.exchange.clone(), b.queue.clone(), b.key.clone()));
                }
                removed.bindings = gone;
                removed.exchanges.push(name.clone());
            }
            Op::Bind(b) => {
                if !self.exchanges.contains_key(&b.exchange) {
                    return Err(ErrorCode::NotFound);
                }
                self.bindings.insert(
                    (b.exchange.clone(), b.queue.clone(), b.key.clone()),
                    b.durable,
                );
            }
            Op::Unbind(b) => {
                if !self.exchanges.contains_key(&b.exchange) {
                    return Err(ErrorCode::NotFound);
                }
                let id = (b.exchange.clone(), b.queue.clone(), b.key.clone());
                if let Some(durable) = self.bindings.remove(&id) {
                    removed.bindings.push(Binding {
                        durable,
                        ..b.clone()
                    });
                    self.auto_delete(&b.exchange);
                    if !self.exchanges.contains_key(&b.exchange) {
                        removed.exchanges.push(b.exchange.clone());
                    }
                }
            }
            Op::RemoveQueue(queue) => {
                let gone: Vec<_> = self
                    .bindings
                    .iter()
                    .filter(|((_, q, _), _)| q == queue)
                    .map(|((e, q, k), &d)| binding(e, q, k, d))
                    .collect();
                for b in &gone {
                    self.bindings
                        .remove(&(b.exchange.clone(), b.queue.clone(), b.key.clone()));
                }
                let exchanges: BTreeSet<String> = gone.iter().map(|b| b.exchange.clone()).collect();
                for e in exchanges {
                    self.auto_delete(&e);
                    if !self.exchanges.contains_key(&e) {
                        removed.exchanges.push(e);
                    }
                }
                removed.bindings = gone;
            }
            Op::Snapshot => {}
        }
        Ok(removed)
    }

    fn route(&self, exchange: &str, key: &str) -> Vec<&str> {
        let kind = self.exchanges[exchange].kind;
        let queues: BTreeSet<&str> = self
            .bindings
            .keys()
            .filter(|(e, _, k)| {
                e == exchange
                    && match kind {
                        ExchangeKind::Direct => k == key,
                        ExchangeKind::Topic => topic_matches(k, key),
                        ExchangeKind::Fanout => true,
                    }
            })
            .map(|(_, q, _)| q.as_str())
            .collect();
        queues.into_iter().collect()
    }
}
