//! The consumers listing: every consumer of this shard's queues, for `ListConsumers`.
//!
//! Contract: plain data, on the owning shard's thread, read-only: a page of at most `limit`
//! consumers of the queues whose names start with `prefix`, after (`after_queue`, `after_tag`)
//! in (queue, tag) order, the session merging every shard's page. A queue's consumers are
//! sorted per listing (a queue has at most `consumers_per_connection_max` per connection), never
//! on the data path. No faults: a missing queue or consumer is simply not listed.

use std::ops::Bound;

use weir_protocol::wire;

use super::QueueHost;

impl QueueHost {
    pub fn list_consumers(
        &self,
        prefix: &str,
        after_queue: &str,
        after_tag: &str,
        limit: usize,
    ) -> Vec<wire::ConsumerInfoT> {
        let mut out = Vec::new();
        let queues = self
            .queues
            .range::<str, _>((Bound::Included(after_queue), Bound::Unbounded))
            .filter(|(name, _)| name.starts_with(prefix));
        for (name, q) in queues {
            let mut consumers: Vec<_> = q
                .consumers
                .iter()
                .filter(|(_, c)| **name != *after_queue || &*c.tag > after_tag)
                .collect();
            consumers.sort_unstable_by(|a, b| a.1.tag.cmp(&b.1.tag));
            for (id, c) in consumers {
                if out.len() >= limit {
                    return out;
                }
                let Some(f) = q.queue.consumer_facts(*id) else {
                    continue;
                };
                let mut i = wire::ConsumerInfoT::default();
                i.queue = Some(name.to_string());
                i.tag = Some(c.tag.to_string());
                i.shard = self.shard;
                i.connection = c.conn.conn;
                i.prefetch = f.prefetch;
                i.unacked = f.unacked;
                i.auto_ack = f.auto_ack;
                i.priority = f.priority;
                i.active = f.active;
                out.push(i);
            }
        }
        out
    }
}
