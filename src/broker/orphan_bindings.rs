//! Bindings whose queue is gone: which ones this shard asks the control-plane writer to remove.
//!
//! Contract: pure functions over this shard's copy of the routing table and its queue host. A
//! queue this shard owns may be gone while bindings to it remain: deleted just before a crash
//! (its unbind not yet durable), or removed now (deleted, auto-deleted, its exclusive owner
//! gone). The writer removes them (`ControlOp::QueueGone`); this only decides which.

use crate::mesh::types::placement;

use crate::broker::host::QueueHost;
use crate::broker::routing::RoutingTable;

/// At start-up: bound queues placed on `shard` that its host does not have (after recovery,
/// every queue it has is durable).
pub fn missing_at_start(
    table: &RoutingTable,
    host: &QueueHost,
    shard: u16,
    shards: u16,
) -> Vec<String> {
    let mut gone: Vec<String> = table
        .bindings(None, None)
        .into_iter()
        .map(|b| b.queue)
        .filter(|q| placement(q, shards) == shard && host.is_durable(q).is_none())
        .collect();
    gone.dedup();
    gone
}

/// Of the queues the host just removed, those the table still binds.
pub fn removed_with_bindings(table: &RoutingTable, removed: Vec<String>) -> Vec<String> {
    removed
        .into_iter()
        .filter(|q| table.has_bindings_to(q))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::routing::ExchangeKind;
    use crate::mesh::msg::RoutingChange;
    use crate::mesh::types::{Binding, ExchangeDecl};
    use crate::mesh::types::{ConnRef, Declare};

    fn table(queues: &[&str]) -> RoutingTable {
        let mut t = RoutingTable::default();
        t.apply(RoutingChange::DeclareExchange(ExchangeDecl {
            name: "x".into(),
            kind: ExchangeKind::Direct,
            durable: true,
            auto_delete: false,
        }))
        .unwrap();
        for q in queues {
            t.apply(RoutingChange::Bind(Binding {
                exchange: "x".into(),
                queue: (*q).into(),
                key: "k".into(),
                durable: true,
            }))
            .unwrap();
        }
        t
    }

    #[test]
    fn a_bound_queue_this_shard_lacks_is_gone_and_others_shards_queues_are_not_its_to_judge() {
        let t = table(&["have", "lost", "elsewhere"]);
        let mut host = QueueHost::new(0);
        let a = ConnRef { shard: 0, conn: 1 };
        let declare = Declare {
            name: "have".into(),
            durable: true,
            ..Default::default()
        };
        host.declare(a, declare, 0).unwrap();
        // With one shard every queue is this shard's.
        assert_eq!(missing_at_start(&t, &host, 0, 1), vec!["elsewhere", "lost"]);
        let shards = 64;
        let mine = placement("lost", shards);
        let want: Vec<&str> = ["elsewhere", "lost"]
            .into_iter()
            .filter(|q| placement(q, shards) == mine)
            .collect();
        assert_eq!(missing_at_start(&t, &host, mine, shards), want);
    }

    #[test]
    fn only_removed_queues_that_are_still_bound_are_reported() {
        let t = table(&["bound"]);
        let removed = vec!["bound".to_string(), "unbound".to_string()];
        assert_eq!(removed_with_bindings(&t, removed), vec!["bound"]);
    }
}
