//! The routing table's plain values: exchange kinds and declarations, bindings, and what a change
//! removed.
//!
//! Contract: owned data (`String`s, no shared names), `Send`, usable on any thread: these are
//! what crosses cores inside a `RoutingChange` and what listings hand out. Faults handled: an
//! exchange kind this broker version does not know converts to `None`, never to a guess.

/// How an exchange routes: the protocol's type, shared with the client.
pub use weir_protocol::ExchangeKind;

/// An exchange's declared properties.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeDecl {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    /// Deleted when its last binding goes (never merely for having none yet).
    pub auto_delete: bool,
}

/// A binding: (exchange, queue, binding key) is its identity. `durable` (its exchange and its
/// queue are both durable) is decided by the caller and stored with it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Binding {
    pub exchange: String,
    pub queue: String,
    pub key: String,
    pub durable: bool,
}

/// What `unbind`, `remove_queue` or `delete_exchange` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// With their stored `durable` flag, so the writer knows which removals to journal.
    pub bindings: Vec<Binding>,
    /// Deleted, or auto-deleted with their last binding.
    pub exchanges: Vec<String>,
}
