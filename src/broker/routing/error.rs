//! The routing layer's one error: a refused change or route, as the schema's code and a sentence.
//!
//! Contract: plain values, any thread. Every refusal is built here so its wording is the same
//! wherever the table refuses. Faults handled: this is the fault; a refused change changes
//! nothing.

use std::fmt;

use weir_protocol::wire::ErrorCode;

use crate::mesh::types::ExchangeDecl;

/// A refused change or route: the schema's code (`NotFound`, `PreconditionFailed`,
/// `AccessRefused`, `InvalidArgument`) and a sentence for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingError {
    pub code: ErrorCode,
    pub message: String,
}

impl fmt::Display for RoutingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for RoutingError {}

pub(super) fn refuse<T>(code: ErrorCode, message: String) -> Result<T, RoutingError> {
    Err(RoutingError { code, message })
}

pub(super) fn not_found(exchange: &str) -> RoutingError {
    RoutingError {
        code: ErrorCode::NotFound,
        message: format!("exchange '{exchange}' not found"),
    }
}

/// The default exchange routes by queue name in the broker itself; it has no table entry that a
/// client could change.
pub(super) fn refuse_default(name: &str, what: &str) -> Result<(), RoutingError> {
    if name.is_empty() {
        return refuse(
            ErrorCode::AccessRefused,
            format!("the default exchange cannot be {what}"),
        );
    }
    Ok(())
}

/// How an existing exchange differs from a declare, in words.
pub(super) fn describe(d: &ExchangeDecl) -> String {
    format!(
        "{} {}{} exchange",
        if d.durable { "durable" } else { "transient" },
        if d.auto_delete { "auto-delete " } else { "" },
        d.kind.name()
    )
}

pub(super) fn differences(existing: &ExchangeDecl, asked: &ExchangeDecl) -> Vec<&'static str> {
    let mut asks = Vec::new();
    if existing.kind != asked.kind {
        asks.push(asked.kind.name());
    }
    if existing.durable != asked.durable {
        asks.push(if asked.durable {
            "durable"
        } else {
            "transient"
        });
    }
    if existing.auto_delete != asked.auto_delete {
        asks.push(if asked.auto_delete {
            "auto-delete"
        } else {
            "no auto-delete"
        });
    }
    asks
}
