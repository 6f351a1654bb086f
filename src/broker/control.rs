//! The control plane: exchanges and bindings. One writer, a read copy on every shard.
//!
//! Contract: two pieces, both plain state on one shard's thread.
//! - `ControlPlane`, on shard 0 only: the authoritative routing table. It validates every change
//!   (`ControlOp`), applies it, and says which catalog records make it durable and which
//!   `RoutingChange` every shard's copy must apply. The shard journals the records in its own
//!   journal, sends the change to every shard (itself included) in order over the mesh, and
//!   answers the client once the records are durable and every copy has applied the change; so
//!   a publish on any shard after a bind-ok routes by it.
//! - `RoutingCopy`, on every shard: the table publishes are routed by, read synchronously by the
//!   shard's sessions (no hop on the publish path), changed only by changes from the writer, in
//!   the writer's order (the mesh is FIFO per pair of shards), plus the shard's count of messages
//!   that routed nowhere.
//!
//! Faults handled: every invalid change is a `RoutingError` naming what and why, and changes
//! nothing. A record that cannot be journaled leaves the change live but not durable; the client
//! is told it was not stored. Bindings to a queue that no longer exists (deleted while its
//! binding's removal was not yet durable, then a crash) are found when a shard receives its
//! start-up copy and removed through the writer.

use std::cell::{Cell, RefCell};

use crate::broker::catalog::CatalogRecord;
use crate::broker::routing::{Removed, RoutingError, RoutingTable};
use crate::mesh::msg::ControlOp;
use crate::mesh::msg::RoutingChange;

/// Connection id of the control plane itself in `ConnRef`s: replies to it are acknowledgements
/// of routing changes, not answers for a client.
pub const CONTROL_CONN: u64 = u64::MAX;

/// The shard that runs the control-plane writer.
pub const CONTROL_SHARD: u16 = 0;

/// What an accepted change asks of the shard.
#[derive(Debug, Default)]
pub struct Applied {
    /// For every shard's copy; `None` when nothing changed (a passive declare).
    pub change: Option<RoutingChange>,
    /// For the writer's journal, before the client is answered.
    pub records: Vec<CatalogRecord>,
}

/// The authoritative routing table (shard 0).
pub struct ControlPlane {
    table: RoutingTable,
    exchanges_max: usize,
    bindings_max: usize,
}

impl ControlPlane {
    /// The writer over the table its journal's replay rebuilt, within `limits.exchanges_max`
    /// and `limits.bindings_max` (every shard holds a copy of what it allows).
    pub fn new(table: RoutingTable, exchanges_max: u32, bindings_max: u32) -> ControlPlane {
        ControlPlane {
            table,
            exchanges_max: exchanges_max as usize,
            bindings_max: bindings_max as usize,
        }
    }

    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    /// Validates and applies one change.
    pub fn execute(&mut self, op: ControlOp) -> Result<Applied, RoutingError> {
        let mut records = Vec::new();
        let change = match op {
            ControlOp::DeclareExchange {
                decl,
                passive: true,
            } => {
                match self.table.exchange(&decl.name) {
                    Some(e) if e.kind == decl.kind => {}
                    Some(e) => {
                        return Err(RoutingError {
                            code: weir_protocol::wire::ErrorCode::PreconditionFailed,
                            message: format!(
                                "exchange '{}' is a {} exchange, not {}",
                                e.name,
                                e.kind.name(),
                                decl.kind.name()
                            ),
                        })
                    }
                    None => return Err(not_found(&decl.name)),
                }
                None
            }
            ControlOp::DeclareExchange { decl, .. } => {
                if self.table.exchange(&decl.name).is_none()
                    && self.table.exchange_count() >= self.exchanges_max
                {
                    return Err(limit(format!(
                        "exchange '{}': the broker holds exchanges_max = {} exchanges",
                        decl.name, self.exchanges_max
                    )));
                }
                let created = self.table.declare_exchange(decl.clone())?;
                if created && decl.durable {
                    records.push(CatalogRecord::DeclareExchange(decl.clone()));
                }
                Some(RoutingChange::DeclareExchange(decl))
            }
            ControlOp::DeleteExchange { name, if_unused } => {
                let durable = self.table.exchange(&name).is_some_and(|e| e.durable);
                self.table.delete_exchange(&name, if_unused)?;
                if durable {
                    records.push(CatalogRecord::DeleteExchange(name.clone()));
                }
                Some(RoutingChange::DeleteExchange(name))
            }
            ControlOp::Bind { mut binding } => {
                let exchange = self
                    .table
                    .exchange(&binding.exchange)
                    .ok_or_else(|| not_found(&binding.exchange))?;
                binding.durable &= exchange.durable;
                let existing = self
                    .table
                    .bindings(Some(&binding.exchange), Some(&binding.queue));
                let existing = existing.iter().find(|b| b.key == binding.key);
                if existing.is_none() && self.table.binding_count() >= self.bindings_max {
                    return Err(limit(format!(
                        "binding of queue '{}' to exchange '{}': the broker holds bindings_max = {} bindings",
                        binding.queue, binding.exchange, self.bindings_max
                    )));
                }
                let was_durable = existing.is_some_and(|b| b.durable);
                self.table.bind(binding.clone())?;
                if binding.durable && !was_durable {
                    records.push(CatalogRecord::Bind(binding.clone()));
                }
                Some(RoutingChange::Bind(binding))
            }
            ControlOp::Unbind { binding } => {
                let removed = self.table.unbind(&binding)?;
                self.records_of(&removed, &mut records);
                Some(RoutingChange::Unbind(binding))
            }
            ControlOp::QueueGone { queue } => {
                let removed = self.table.remove_queue(&queue);
                self.records_of(&removed, &mut records);
                Some(RoutingChange::RemoveQueue(queue))
            }
        };
        Ok(Applied { change, records })
    }

    /// The records that make a removal durable: durable bindings unbound, and exchanges
    /// auto-deleted with their last binding (a durable one's deletion must be journaled too, or
    /// it would come back after a restart).
    fn records_of(&self, removed: &Removed, records: &mut Vec<CatalogRecord>) {
        for b in removed.bindings.iter().filter(|b| b.durable) {
            records.push(CatalogRecord::Unbind(b.clone()));
        }
        // The exchange is gone from the table already: its durability is whether any of its
        // removed bindings was durable, or, with none durable, unknown, so it is journaled
        // anyway (deleting an exchange the log does not hold is skipped on replay).
        for name in &removed.exchanges {
            records.push(CatalogRecord::DeleteExchange(name.clone()));
        }
    }

    /// Every durable exchange and binding: written again before the journal segments holding
    /// their first records are reclaimed.
    pub fn restatement(&self) -> Vec<CatalogRecord> {
        let (exchanges, bindings) = self.table.durable_state();
        exchanges
            .into_iter()
            .map(CatalogRecord::DeclareExchange)
            .chain(bindings.into_iter().map(CatalogRecord::Bind))
            .collect()
    }
}

fn limit(message: String) -> RoutingError {
    RoutingError {
        code: weir_protocol::wire::ErrorCode::LimitExceeded,
        message,
    }
}

fn not_found(exchange: &str) -> RoutingError {
    RoutingError {
        code: weir_protocol::wire::ErrorCode::NotFound,
        message: format!("exchange '{exchange}' not found"),
    }
}

/// One shard's copy of the routing table, read by its sessions.
#[derive(Default)]
pub struct RoutingCopy {
    pub table: RefCell<RoutingTable>,
    /// Messages published on this shard that routed to no queue and were not mandatory: dropped.
    pub unroutable: Cell<u64>,
    /// Set once the writer's start-up copy has arrived: the shard serves nobody before.
    pub ready: Cell<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::routing::ExchangeKind;
    use crate::mesh::types::{Binding, ExchangeDecl};

    fn decl(name: &str, durable: bool, auto_delete: bool) -> ExchangeDecl {
        ExchangeDecl {
            name: name.into(),
            kind: ExchangeKind::Topic,
            durable,
            auto_delete,
        }
    }

    fn binding(exchange: &str, queue: &str, key: &str, durable: bool) -> Binding {
        Binding {
            exchange: exchange.into(),
            queue: queue.into(),
            key: key.into(),
            durable,
        }
    }

    #[test]
    fn only_durable_things_are_journaled_and_copies_get_every_change() {
        let mut cp = ControlPlane::new(RoutingTable::new(), 100, 100);
        let durable = cp
            .execute(ControlOp::DeclareExchange {
                decl: decl("logs", true, false),
                passive: false,
            })
            .unwrap();
        assert!(matches!(
            durable.records[..],
            [CatalogRecord::DeclareExchange(_)]
        ));
        let transient = cp
            .execute(ControlOp::DeclareExchange {
                decl: decl("tmp", false, false),
                passive: false,
            })
            .unwrap();
        assert!(transient.records.is_empty());
        assert!(transient.change.is_some());
        // A redeclare changes nothing durable but still reaches every copy.
        let again = cp
            .execute(ControlOp::DeclareExchange {
                decl: decl("logs", true, false),
                passive: false,
            })
            .unwrap();
        assert!(again.records.is_empty());

        // Durable queue + durable exchange: journaled once, however often it is bound.
        let b = cp
            .execute(ControlOp::Bind {
                binding: binding("logs", "q", "a.#", true),
            })
            .unwrap();
        assert!(matches!(b.records[..], [CatalogRecord::Bind(_)]));
        let b2 = cp
            .execute(ControlOp::Bind {
                binding: binding("logs", "q", "a.#", true),
            })
            .unwrap();
        assert!(b2.records.is_empty());
        // A transient queue's binding, or one to a transient exchange, is not journaled.
        for (exchange, queue_durable) in [("logs", false), ("tmp", true)] {
            let t = cp
                .execute(ControlOp::Bind {
                    binding: binding(exchange, "t", "x", queue_durable),
                })
                .unwrap();
            assert!(t.records.is_empty(), "{exchange} {queue_durable}");
        }
        let gone = cp
            .execute(ControlOp::QueueGone { queue: "q".into() })
            .unwrap();
        assert!(matches!(gone.records[..], [CatalogRecord::Unbind(_)]));
        assert!(matches!(
            gone.change,
            Some(RoutingChange::RemoveQueue(ref q)) if q == "q"
        ));
        assert_eq!(
            cp.restatement().len(),
            1,
            "only the durable exchange is left"
        );
    }

    #[test]
    fn exchanges_and_bindings_past_their_limits_are_refused() {
        let mut cp = ControlPlane::new(RoutingTable::new(), 1, 2);
        let declare = |name: &str| ControlOp::DeclareExchange {
            decl: decl(name, true, false),
            passive: false,
        };
        cp.execute(declare("a")).unwrap();
        cp.execute(declare("a")).expect("a redeclare adds nothing");
        let e = cp.execute(declare("b")).unwrap_err();
        assert_eq!(e.code, weir_protocol::wire::ErrorCode::LimitExceeded);
        assert!(e.message.contains("exchanges_max = 1"), "{}", e.message);
        for key in ["x", "y", "x"] {
            cp.execute(ControlOp::Bind {
                binding: binding("a", "q", key, true),
            })
            .unwrap();
        }
        let e = cp
            .execute(ControlOp::Bind {
                binding: binding("a", "q", "z", true),
            })
            .unwrap_err();
        assert!(e.message.contains("bindings_max = 2"), "{}", e.message);
    }

    #[test]
    fn passive_declares_check_and_change_nothing() {
        let mut cp = ControlPlane::new(RoutingTable::new(), 100, 100);
        let missing = cp.execute(ControlOp::DeclareExchange {
            decl: decl("logs", true, false),
            passive: true,
        });
        assert_eq!(
            missing.unwrap_err().code,
            weir_protocol::wire::ErrorCode::NotFound
        );
        cp.execute(ControlOp::DeclareExchange {
            decl: decl("logs", true, false),
            passive: false,
        })
        .unwrap();
        let ok = cp
            .execute(ControlOp::DeclareExchange {
                decl: decl("logs", false, true),
                passive: true,
            })
            .unwrap();
        assert!(ok.change.is_none() && ok.records.is_empty());
        let mut fanout = decl("logs", true, false);
        fanout.kind = ExchangeKind::Fanout;
        let wrong = cp
            .execute(ControlOp::DeclareExchange {
                decl: fanout,
                passive: true,
            })
            .unwrap_err();
        assert_eq!(
            wrong.code,
            weir_protocol::wire::ErrorCode::PreconditionFailed
        );
        assert!(wrong.message.contains("topic"), "{}", wrong.message);
    }

    #[test]
    fn an_auto_delete_exchange_leaving_with_its_last_binding_is_journaled() {
        let mut cp = ControlPlane::new(RoutingTable::new(), 100, 100);
        cp.execute(ControlOp::DeclareExchange {
            decl: decl("events", true, true),
            passive: false,
        })
        .unwrap();
        cp.execute(ControlOp::Bind {
            binding: binding("events", "q", "#", true),
        })
        .unwrap();
        let a = cp
            .execute(ControlOp::Unbind {
                binding: binding("events", "q", "#", true),
            })
            .unwrap();
        assert!(matches!(
            a.records[..],
            [CatalogRecord::Unbind(_), CatalogRecord::DeleteExchange(_)]
        ));
        assert!(cp.table().exchange("events").is_none());
    }
}
