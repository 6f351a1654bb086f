//! The routing table's own plain values: exchange kinds, and what a change removed.
//! (Declarations and bindings, which cross cores inside a `RoutingChange`, are `mesh::types`.)
//!
//! Contract: owned data (`String`s, no shared names), `Send`, usable on any thread. Faults
//! handled: an exchange kind this broker version does not know converts to `None`, never to a
//! guess.

use crate::mesh::types::Binding;

/// How an exchange routes: the protocol's type, shared with the client.
pub use weir_protocol::ExchangeKind;

/// What `unbind`, `remove_queue` or `delete_exchange` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// With their stored `durable` flag, so the writer knows which removals to journal.
    pub bindings: Vec<Binding>,
    /// Deleted, or auto-deleted with their last binding.
    pub exchanges: Vec<String>,
}
