//! Unit tests of the routing table: each rule, refusal and listing, one case at a time.

use weir_protocol::wire::{self, ErrorCode};

use super::matcher::Matcher;
use super::*;
use crate::mesh::msg::{RoutingChange, RoutingSnapshot};
use crate::mesh::types::{Binding, ExchangeDecl};

pub(super) fn decl(
    name: &str,
    kind: ExchangeKind,
    durable: bool,
    auto_delete: bool,
) -> ExchangeDecl {
    ExchangeDecl {
        name: name.into(),
        kind,
        durable,
        auto_delete,
    }
}

pub(super) fn binding(exchange: &str, queue: &str, key: &str, durable: bool) -> Binding {
    Binding {
        exchange: exchange.into(),
        queue: queue.into(),
        key: key.into(),
        durable,
    }
}

fn routed(t: &RoutingTable, exchange: &str, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    t.route(exchange, key, &mut out).unwrap();
    let mut names: Vec<String> = out.iter().map(|q| q.to_string()).collect();
    names.sort();
    names
}

fn table_with(kind: ExchangeKind, bindings: &[(&str, &str)]) -> RoutingTable {
    let mut t = RoutingTable::new();
    assert!(t.declare_exchange(decl("x", kind, true, false)).unwrap());
    for (queue, key) in bindings {
        t.bind(binding("x", queue, key, true)).unwrap();
    }
    t
}

#[test]
fn kinds_convert_to_and_from_the_wire() {
    for k in [
        ExchangeKind::Direct,
        ExchangeKind::Topic,
        ExchangeKind::Fanout,
    ] {
        assert_eq!(ExchangeKind::from_wire(k.to_wire()), Some(k));
    }
    assert_eq!(ExchangeKind::from_wire(wire::ExchangeKind(9)), None);
    assert_eq!(ExchangeKind::Topic.name(), "topic");
}

#[test]
fn direct_routes_by_the_exact_key_only() {
    let t = table_with(
        ExchangeKind::Direct,
        &[
            ("q1", "orders"),
            ("q2", "orders"),
            ("q3", "orders.eu"),
            ("q4", ""),
        ],
    );
    assert_eq!(routed(&t, "x", "orders"), ["q1", "q2"]);
    assert_eq!(routed(&t, "x", "orders.eu"), ["q3"]);
    assert_eq!(routed(&t, "x", ""), ["q4"]);
    assert!(routed(&t, "x", "Orders").is_empty());
    assert!(routed(&t, "x", "orders.*").is_empty());
    assert!(routed(&t, "x", "#").is_empty());
}

#[test]
fn fanout_ignores_keys_and_lists_each_queue_once() {
    let mut t = table_with(
        ExchangeKind::Fanout,
        &[("q1", "a"), ("q1", "b"), ("q2", ""), ("q3", "whatever")],
    );
    for key in ["", "a", "zzz", "#"] {
        assert_eq!(routed(&t, "x", key), ["q1", "q2", "q3"]);
    }
    // q1 stays while one of its two bindings is left.
    t.unbind(&binding("x", "q1", "a", true)).unwrap();
    assert_eq!(routed(&t, "x", ""), ["q1", "q2", "q3"]);
    t.unbind(&binding("x", "q1", "b", true)).unwrap();
    assert_eq!(routed(&t, "x", ""), ["q2", "q3"]);
}

#[test]
fn a_queue_matched_by_two_bindings_gets_the_message_once() {
    let t = table_with(
        ExchangeKind::Topic,
        &[
            ("q", "a.*"),
            ("q", "#"),
            ("q", "a.b"),
            ("q", "#.#"),
            ("r", "a.b"),
        ],
    );
    let mut out = Vec::new();
    t.route("x", "a.b", &mut out).unwrap();
    out.sort();
    assert_eq!(out, ["q", "r"]);
    // Appends: what `out` held stays.
    t.route("x", "c", &mut out).unwrap();
    assert_eq!(out, ["q", "r", "q"]);
}

/// Each topic case, with the reference matcher and with the trie.
#[test]
fn topic_edge_cases() {
    let cases: &[(&str, &str, bool)] = &[
        ("#", "", true),
        ("#", "a", true),
        ("#", "a.b.c", true),
        ("#.#", "", true),
        ("", "", true),
        ("", "a", false),
        ("a", "", false),
        ("a.#.#.b", "a.b", true),
        ("a.#.#.b", "a.x.b", true),
        ("a.#.#.b", "a.x.y.b", true),
        ("a.#.#.b", "a.b.c", false),
        ("#.b", "b", true),
        ("#.b", "x.y.b", true),
        ("#.b", "b.x", false),
        ("a.*.b", "a..b", true),
        ("a.#.b", "a..b", true),
        ("a.b", "a..b", false),
        ("a", "a", true),
        ("a", "b", false),
        ("*", "abc", true),
        ("#", "abc", true),
        ("a*", "ab", false),
        ("a*", "a*", true),
        ("A", "a", false),
        ("*", "", false),
        ("*", "x", true),
        ("*", ".", false),
        ("*.*", ".", true),
        ("a.#", "a", true),
        ("a.#", "a.b.c", true),
        ("a.#", "b", false),
        ("a.", "a.", true),
        ("a.", "a", false),
        (".a", ".a", true),
        ("*.a", ".a", true),
        ("#.a.#", "a", true),
        ("#.a.#", "b.a.c", true),
        ("#.a.#", "a.a.a", true),
        ("#.a.#", "b.c", false),
        ("*.#", "", false),
        ("*.#", "a", true),
        ("#.*", "a.b.c", true),
    ];
    for &(pattern, key, expected) in cases {
        assert_eq!(
            topic_matches(pattern, key),
            expected,
            "reference: '{pattern}' vs '{key}'"
        );
        let t = table_with(ExchangeKind::Topic, &[("q", pattern)]);
        let want: &[&str] = if expected { &["q"] } else { &[] };
        assert_eq!(routed(&t, "x", key), want, "trie: '{pattern}' vs '{key}'");
    }
    assert_eq!(topic_words("").count(), 0);
    assert_eq!(topic_words("a..b").collect::<Vec<_>>(), ["a", "", "b"]);
    assert_eq!(topic_words(".").collect::<Vec<_>>(), ["", ""]);
}

#[test]
fn many_hashes_do_not_blow_up() {
    let pattern = ["#"; 40].join(".") + ".a." + &["#"; 40].join(".") + ".a";
    let t = table_with(
        ExchangeKind::Topic,
        &[("q", &pattern), ("r", "#.a.#.a.#.a.#.b")],
    );
    let key = ["a"; 200].join(".");
    assert_eq!(routed(&t, "x", &key), ["q"]);
}

#[test]
fn topic_bindings_removed_leave_no_trie_behind() {
    // Several queues end on one node ("#.#" is "#"), so `more` is used and emptied too.
    let keys = [
        "a.b.c", "a.*.c", "#.c", "a.#", "", "#", "a..b", "x.#.#.y", "#.#", "#", "a.#.#",
    ];
    let mut t = RoutingTable::new();
    t.declare_exchange(decl("x", ExchangeKind::Topic, false, false))
        .unwrap();
    let shape = |t: &RoutingTable| match &t.exchanges["x"].matcher {
        Matcher::Topic(trie) => trie.shape(),
        _ => unreachable!(),
    };
    let empty = shape(&t);
    assert_eq!(empty, (1, 0, 0, 0));
    for round in 0..3 {
        for (i, key) in keys.iter().enumerate() {
            t.bind(binding("x", &format!("q{}", i % 3), key, false))
                .unwrap();
        }
        assert_ne!(shape(&t), empty);
        if round % 2 == 0 {
            for (i, key) in keys.iter().enumerate() {
                t.unbind(&binding("x", &format!("q{}", i % 3), key, false))
                    .unwrap();
            }
        } else {
            for q in ["q0", "q1", "q2"] {
                t.remove_queue(q);
            }
        }
        assert_eq!(shape(&t), empty, "round {round}");
        assert_eq!(t.queues.ids.len(), 0);
        assert!(t.queues.slots.len() <= 3);
    }
}

#[test]
fn redeclaring_differently_names_each_difference() {
    let mut t = RoutingTable::new();
    assert!(t
        .declare_exchange(decl("logs", ExchangeKind::Fanout, true, false))
        .unwrap());
    assert!(!t
        .declare_exchange(decl("logs", ExchangeKind::Fanout, true, false))
        .unwrap());
    let e = t
        .declare_exchange(decl("logs", ExchangeKind::Topic, true, false))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::PreconditionFailed);
    assert_eq!(
        e.message,
        "exchange 'logs' exists as a durable fanout exchange; this declare asks for topic"
    );
    let e = t
        .declare_exchange(decl("logs", ExchangeKind::Direct, false, true))
        .unwrap_err();
    assert_eq!(
        e.message,
        "exchange 'logs' exists as a durable fanout exchange; \
         this declare asks for direct, transient, auto-delete"
    );
    assert_eq!(t.exchange("logs").unwrap().kind, ExchangeKind::Fanout);
}

#[test]
fn the_default_exchange_and_reserved_names_are_refused() {
    let mut t = RoutingTable::new();
    let e = t
        .declare_exchange(decl("", ExchangeKind::Direct, true, false))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessRefused);
    assert!(
        e.message.contains("default exchange cannot be declared"),
        "{}",
        e.message
    );
    let e = t
        .declare_exchange(decl("weir.x", ExchangeKind::Topic, true, false))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessRefused);
    assert!(e.message.contains("'weir.'"), "{}", e.message);
    let e = t.delete_exchange("", false).unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessRefused);
    assert!(e.message.contains("cannot be deleted"), "{}", e.message);
    let e = t.bind(binding("", "q", "q", true)).unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessRefused);
    assert!(e.message.contains("cannot be bound"), "{}", e.message);
    let e = t.unbind(&binding("", "q", "q", true)).unwrap_err();
    assert_eq!(e.code, ErrorCode::AccessRefused);
    assert_eq!(t.exchange_count(), 0);
    // A name that merely contains the prefix is an ordinary name.
    assert!(t
        .declare_exchange(decl("not.weir.x", ExchangeKind::Topic, true, false))
        .unwrap());
    t.declare_exchange(decl("x", ExchangeKind::Topic, true, false))
        .unwrap();
    let e = t.bind(binding("x", "", "k", true)).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
}

#[test]
fn unknown_exchanges_are_not_found() {
    let mut t = RoutingTable::new();
    let mut out = Vec::new();
    let errors = [
        t.bind(binding("nope", "q", "k", true)).unwrap_err(),
        t.unbind(&binding("nope", "q", "k", true)).unwrap_err(),
        t.delete_exchange("nope", false).unwrap_err(),
        t.delete_exchange("weir.x", false).unwrap_err(),
        t.route("nope", "k", &mut out).unwrap_err(),
    ];
    for e in errors {
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("exchange '"), "{}", e.message);
    }
    assert_eq!(
        t.route("nope", "k", &mut out).unwrap_err().message,
        "exchange 'nope' not found"
    );
    assert!(t.exchange("nope").is_none());
}

#[test]
fn delete_if_unused_refuses_an_exchange_with_bindings() {
    let mut t = table_with(ExchangeKind::Direct, &[("q1", "a"), ("q2", "b")]);
    let e = t.delete_exchange("x", true).unwrap_err();
    assert_eq!(e.code, ErrorCode::PreconditionFailed);
    assert_eq!(e.message, "exchange 'x' has 2 bindings");
    let removed = t.delete_exchange("x", false).unwrap();
    assert_eq!(
        removed,
        Removed {
            bindings: vec![binding("x", "q1", "a", true), binding("x", "q2", "b", true)],
            exchanges: vec!["x".into()],
        }
    );
    assert_eq!(t.binding_count(), 0);
    assert!(!t.has_bindings_to("q1"));
    t.declare_exchange(decl("y", ExchangeKind::Direct, true, false))
        .unwrap();
    assert_eq!(t.delete_exchange("y", true).unwrap().exchanges, ["y"]);
}

#[test]
fn unbinding_what_is_not_bound_is_ok_and_removes_nothing() {
    let mut t = table_with(ExchangeKind::Topic, &[("q", "a")]);
    assert_eq!(
        t.unbind(&binding("x", "q", "b", true)).unwrap(),
        Removed::default()
    );
    assert_eq!(
        t.unbind(&binding("x", "other", "a", true)).unwrap(),
        Removed::default()
    );
    assert_eq!(t.binding_count(), 1);
    // The stored durable flag is what is reported, not the one asked with.
    let removed = t.unbind(&binding("x", "q", "a", false)).unwrap();
    assert_eq!(removed.bindings, [binding("x", "q", "a", true)]);
    assert!(removed.exchanges.is_empty(), "not auto-delete");
    assert_eq!(t.exchange_count(), 1);
}

#[test]
fn binding_twice_is_idempotent_and_updates_durability() {
    let mut t = table_with(ExchangeKind::Direct, &[]);
    assert!(t.bind(binding("x", "q", "k", false)).unwrap());
    assert!(!t.bind(binding("x", "q", "k", true)).unwrap());
    assert_eq!(t.binding_count(), 1);
    assert_eq!(t.bindings(None, None), [binding("x", "q", "k", true)]);
    assert_eq!(routed(&t, "x", "k"), ["q"]);
}

#[test]
fn an_auto_delete_exchange_goes_with_its_last_binding() {
    let mut t = RoutingTable::new();
    t.declare_exchange(decl("ad", ExchangeKind::Topic, true, true))
        .unwrap();
    t.declare_exchange(decl("keep", ExchangeKind::Topic, true, false))
        .unwrap();
    // No binding yet: it stays.
    assert!(t.exchange("ad").is_some());
    t.bind(binding("ad", "q1", "a", true)).unwrap();
    t.bind(binding("ad", "q2", "b", true)).unwrap();
    let r = t.unbind(&binding("ad", "q1", "a", true)).unwrap();
    assert!(r.exchanges.is_empty());
    let r = t.unbind(&binding("ad", "q2", "b", true)).unwrap();
    assert_eq!(r.exchanges, ["ad"]);
    assert!(t.exchange("ad").is_none());

    // Through remove_queue: only the exchange that lost its last binding goes.
    t.declare_exchange(decl("ad", ExchangeKind::Fanout, false, true))
        .unwrap();
    t.declare_exchange(decl("ad2", ExchangeKind::Direct, false, true))
        .unwrap();
    t.bind(binding("ad", "q1", "", false)).unwrap();
    t.bind(binding("ad", "q1", "x", false)).unwrap();
    t.bind(binding("ad2", "q1", "k", false)).unwrap();
    t.bind(binding("ad2", "q2", "k", false)).unwrap();
    t.bind(binding("keep", "q1", "#", true)).unwrap();
    let r = t.remove_queue("q1");
    assert_eq!(
        r.bindings,
        [
            binding("ad", "q1", "", false),
            binding("ad", "q1", "x", false),
            binding("ad2", "q1", "k", false),
            binding("keep", "q1", "#", true),
        ]
    );
    assert_eq!(r.exchanges, ["ad"]);
    assert!(t.exchange("ad").is_none());
    assert!(t.exchange("ad2").is_some());
    assert!(t.exchange("keep").is_some());
    assert!(!t.has_bindings_to("q1"));
    assert!(t.has_bindings_to("q2"));
    assert_eq!(t.remove_queue("q1"), Removed::default());
}

#[test]
fn listings_and_durable_state() {
    let mut t = RoutingTable::new();
    t.declare_exchange(decl("b", ExchangeKind::Topic, true, false))
        .unwrap();
    t.declare_exchange(decl("a", ExchangeKind::Direct, false, false))
        .unwrap();
    t.declare_exchange(decl("c", ExchangeKind::Fanout, true, true))
        .unwrap();
    t.bind(binding("b", "q2", "z", true)).unwrap();
    t.bind(binding("b", "q1", "y", false)).unwrap();
    t.bind(binding("b", "q1", "x", true)).unwrap();
    t.bind(binding("a", "q1", "k", false)).unwrap();
    t.bind(binding("c", "q1", "", true)).unwrap();
    let names: Vec<(&str, usize)> = t
        .exchanges()
        .into_iter()
        .map(|(d, n)| (d.name.as_str(), n))
        .collect();
    assert_eq!(names, [("a", 1), ("b", 3), ("c", 1)]);
    assert_eq!(
        t.bindings(None, None),
        [
            binding("a", "q1", "k", false),
            binding("b", "q1", "x", true),
            binding("b", "q1", "y", false),
            binding("b", "q2", "z", true),
            binding("c", "q1", "", true),
        ]
    );
    assert_eq!(
        t.bindings(None, Some("q1")),
        [
            binding("a", "q1", "k", false),
            binding("b", "q1", "x", true),
            binding("b", "q1", "y", false),
            binding("c", "q1", "", true),
        ]
    );
    assert_eq!(
        t.bindings(Some("b"), Some("q2")),
        [binding("b", "q2", "z", true)]
    );
    assert!(t.bindings(Some("nope"), None).is_empty());
    assert!(t.bindings(None, Some("nope")).is_empty());
    let (exchanges, bindings) = t.durable_state();
    assert_eq!(
        exchanges,
        [
            decl("b", ExchangeKind::Topic, true, false),
            decl("c", ExchangeKind::Fanout, true, true)
        ]
    );
    assert_eq!(
        bindings,
        [
            binding("b", "q1", "x", true),
            binding("b", "q2", "z", true),
            binding("c", "q1", "", true),
        ]
    );
    assert_eq!((t.exchange_count(), t.binding_count()), (3, 5));
}

#[test]
fn a_snapshot_crosses_threads_and_routes_there() {
    // The table itself is not `Send` (asserted at compile time in `routing`): its snapshot is.
    fn send_sync<T: Send + Sync>() {}
    send_sync::<RoutingChange>();
    send_sync::<RoutingSnapshot>();
    let t = table_with(ExchangeKind::Topic, &[("q", "a.#"), ("r", "*.b")]);
    let change = RoutingChange::Snapshot(t.snapshot());
    let copied = std::thread::spawn(move || {
        let mut copy = RoutingTable::new();
        copy.apply(change).unwrap();
        assert_eq!(routed(&copy, "x", "a.b"), ["q", "r"]);
        copy.bindings(None, None)
    })
    .join()
    .unwrap();
    assert_eq!(copied, t.bindings(None, None));
}

/// A copy rebuilt from a snapshot routes in the writer's order, not in the bindings' sorted
/// order, where removals left a list out of either.
#[test]
fn a_snapshot_keeps_the_writers_route_order() {
    let mut t = RoutingTable::new();
    for (name, kind) in [
        ("d", ExchangeKind::Direct),
        ("f", ExchangeKind::Fanout),
        ("t", ExchangeKind::Topic),
    ] {
        t.declare_exchange(decl(name, kind, true, false)).unwrap();
    }
    // Fanout: q2 keeps the place its first binding gave it after that binding goes.
    for (queue, key) in [("q2", "a"), ("q1", ""), ("q2", "b")] {
        t.bind(binding("f", queue, key, true)).unwrap();
    }
    t.unbind(&binding("f", "q2", "a", true)).unwrap();
    // Direct: later queues of one key, in bind order net of removals.
    for queue in ["q3", "q1", "q2", "q0"] {
        t.bind(binding("d", queue, "k", queue != "q2")).unwrap();
    }
    t.unbind(&binding("d", "q3", "k", true)).unwrap();
    // Topic: `#` and `#.#` end on one node; removing q1's later binding there drops its first
    // entry, leaving q2 ahead of it.
    for (queue, key) in [("q1", "#"), ("q2", "#"), ("q1", "#.#"), ("q0", "a.*")] {
        t.bind(binding("t", queue, key, false)).unwrap();
    }
    t.unbind(&binding("t", "q1", "#.#", false)).unwrap();
    let route = |t: &RoutingTable, exchange: &str, key: &str| {
        let mut out = Vec::new();
        t.route(exchange, key, &mut out).unwrap();
        out.into_iter().map(String::from).collect::<Vec<_>>()
    };
    assert_eq!(route(&t, "f", ""), ["q2", "q1"]);
    assert_eq!(route(&t, "d", "k"), ["q1", "q2", "q0"]);
    assert_eq!(route(&t, "t", "a.b"), ["q0", "q2", "q1"]);

    let snapshot = t.snapshot();
    assert_eq!(
        snapshot,
        t.snapshot(),
        "a snapshot depends only on the table's state"
    );
    let mut copy = RoutingTable::new();
    copy.declare_exchange(decl("gone", ExchangeKind::Direct, true, false))
        .unwrap();
    assert_eq!(
        copy.apply(RoutingChange::Snapshot(snapshot)).unwrap(),
        Removed::default()
    );
    assert_eq!(copy.exchanges(), t.exchanges());
    assert_eq!(copy.bindings(None, None), t.bindings(None, None));
    for (exchange, key) in [("f", ""), ("d", "k"), ("t", "a.b"), ("t", "")] {
        assert_eq!(
            route(&copy, exchange, key),
            route(&t, exchange, key),
            "{exchange} '{key}'"
        );
    }
    // And the two stay together under the same later changes.
    for table in [&mut t, &mut copy] {
        table.unbind(&binding("t", "q2", "#", false)).unwrap();
        table.bind(binding("t", "q2", "#.#", false)).unwrap();
        table.remove_queue("q1");
    }
    for (exchange, key) in [("f", ""), ("d", "k"), ("t", "a.b")] {
        assert_eq!(route(&copy, exchange, key), route(&t, exchange, key));
    }
}
