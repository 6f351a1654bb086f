//! Routing: exchanges, their bindings, and the queues a routing key reaches.
//!
//! Contract: plain data without I/O. A `RoutingTable` lives on one thread (the control-plane
//! writer's on shard 0, a copy on every shard) and is not `Send`; what crosses cores is a
//! `RoutingChange`, owned values that are `Send`, the start-up copy included (a
//! `RoutingSnapshot` the copy rebuilds its table from). Both facts are asserted at compile time
//! below. Faults handled: every refused change or route is a `RoutingError` and changes nothing.
//!
//! Modules: `table` (the table, its changes and `route`), `change` (what crosses cores), `decl`
//! (the plain values), `error`, `matcher` (direct and fanout lists, dispatch by kind), `trie`
//! (topic matching), `intern` (queue names and topic words), `hash` (the seeded hasher).

mod change;
mod decl;
mod error;
pub mod hash;
mod intern;
mod matcher;
mod table;
mod trie;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use decl::{ExchangeKind, Removed};
pub use error::RoutingError;
pub use table::{RoutingTable, RESERVED_PREFIX};
pub use trie::{topic_matches, topic_words};

// A table must not be: its names are one thread's `Rc<str>`s.
assert_not_send!(RoutingTable);
