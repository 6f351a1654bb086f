//! Requests every shard answers: a queue listing and the broker's status, sent to all shards
//! under one id and answered once the last shard replied.
//!
//! Contract: runs on the connection's shard. A gather is one `Pending` entry that folds each
//! shard's reply in and is put back until none is left; the answer is built only then (queues
//! sorted by name and cut to the page, shards in order).
//!
//! Faults handled: a shard that answers with something else (its part is left out; the answer
//! still comes once every shard replied).

use bytes::BytesMut;
use weir_protocol::wire::{self, BodyT};

use super::replies::LIST_PAGE_MAX;
use super::{Addressed, Flow, Pending, Session};
use crate::mesh::msg::{Op, Reply};
use crate::mesh::types::ShardStatus;

/// A queue listing waiting for its shards.
pub(super) struct ListGather {
    request_id: u64,
    remaining: u16,
    limit: usize,
    queues: Vec<wire::QueueInfoT>,
}

/// A status request waiting for its shards.
pub(super) struct StatusGather {
    request_id: u64,
    remaining: u16,
    shards: Vec<ShardStatus>,
}

impl Session {
    pub(super) fn list_queues(
        &mut self,
        request_id: u64,
        prefix: &str,
        after: &str,
        limit: u32,
        outbound: &mut Vec<Addressed>,
    ) -> Flow {
        // A page's tables (a QueueInfo and its arguments per queue) must stay within the client
        // decoder's verifier budget: 1000 queues are about 2000 tables.
        let limit = if limit == 0 {
            LIST_PAGE_MAX
        } else {
            limit.min(LIST_PAGE_MAX as u32) as usize
        };
        let shards = self.ctx.shard_count();
        let (prefix, after) = (prefix.to_string(), after.to_string());
        let id = self.next_id();
        let gather = ListGather {
            request_id,
            remaining: shards,
            limit,
            queues: Vec::new(),
        };
        self.pending.insert(id, Pending::List(gather));
        for shard in 0..shards {
            // One more than the page, to know whether more follow.
            let op = Op::List {
                prefix: prefix.clone(),
                after: after.clone(),
                limit: limit + 1,
            };
            outbound.push(Addressed { shard, id, op });
        }
        Flow::Continue
    }

    pub(super) fn gathered_list(
        &mut self,
        id: u64,
        mut gather: ListGather,
        reply: Reply,
        out: &mut BytesMut,
    ) {
        if let Reply::List(more) = reply {
            gather.queues.extend(more);
        }
        if gather.remaining > 1 {
            gather.remaining -= 1;
            self.pending.insert(id, Pending::List(gather));
            return;
        }
        let ListGather {
            request_id,
            limit,
            mut queues,
            ..
        } = gather;
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        let more = queues.len() > limit;
        queues.truncate(limit);
        let mut list = wire::QueueListT::default();
        list.queues = Some(queues);
        list.more = more;
        self.reply(out, request_id, BodyT::QueueList(Box::new(list)));
    }

    pub(super) fn get_status(&mut self, request_id: u64, outbound: &mut Vec<Addressed>) -> Flow {
        let shards = self.ctx.shard_count();
        let id = self.next_id();
        let gather = StatusGather {
            request_id,
            remaining: shards,
            shards: Vec::new(),
        };
        self.pending.insert(id, Pending::Status(gather));
        for shard in 0..shards {
            outbound.push(Addressed {
                shard,
                id,
                op: Op::Status,
            });
        }
        Flow::Continue
    }

    pub(super) fn gathered_status(
        &mut self,
        now_ms: u64,
        id: u64,
        mut gather: StatusGather,
        reply: Reply,
        out: &mut BytesMut,
    ) {
        if let Reply::ShardStatus(st) = reply {
            gather.shards.push(*st);
        }
        if gather.remaining > 1 {
            gather.remaining -= 1;
            self.pending.insert(id, Pending::Status(gather));
            return;
        }
        let StatusGather {
            request_id,
            mut shards,
            ..
        } = gather;
        shards.sort_by_key(|s| s.shard);
        let status = self.status(now_ms, shards);
        self.reply(out, request_id, BodyT::Status(Box::new(status)));
    }

    /// The `Status` reply: totals, every shard's counters by name (`shard.N.what`), so that
    /// counters can be added without changing the schema, each marked a gauge (a level) or not
    /// (a count since the broker started), and every shard's latency histograms.
    /// `shards_ready` is how many shards answered: a shard serves requests only once it has
    /// recovered, so each answer is a shard ready.
    fn status(&self, now_ms: u64, shards: Vec<ShardStatus>) -> wire::StatusT {
        let mut st = wire::StatusT::default();
        st.broker_version = Some(self.ctx.broker_version.to_string());
        st.shard_count = self.ctx.shard_count();
        st.uptime_ms = now_ms.saturating_sub(self.ctx.started_ms);
        st.connections = shards.iter().map(|s| s.connections).sum::<u64>() as u32;
        st.queues = shards.iter().map(|s| s.queues).sum::<u64>() as u32;
        st.shards_ready = shards.len() as u16;
        let mut counters = Vec::new();
        let mut histograms = Vec::new();
        for s in &shards {
            const GAUGE: bool = true;
            const COUNT: bool = false;
            let fields = [
                ("connections", s.connections, GAUGE),
                ("queues", s.queues, GAUGE),
                ("messages_ready", s.messages_ready, GAUGE),
                ("messages_unacked", s.messages_unacked, GAUGE),
                ("consumers", s.consumers, GAUGE),
                ("messages_dropped", s.dropped, COUNT),
                ("messages_dead_lettered", s.dead_lettered, COUNT),
                ("dead_letter.cycles", s.dead_letter_cycles, COUNT),
                ("dead_letter.refused", s.dead_letter_refused, COUNT),
                ("messages_unroutable", s.unroutable, COUNT),
                ("exchanges", s.exchanges, GAUGE),
                ("bindings", s.bindings, GAUGE),
                ("cache_bytes", s.cache_bytes, GAUGE),
                ("cache_bytes_max", s.cache_bytes_max, GAUGE),
                ("journal.commits", s.journal_commits, COUNT),
                ("journal.records", s.journal_records, COUNT),
                ("journal.bytes_written", s.journal_bytes_written, COUNT),
                ("journal.fdatasyncs", s.journal_fdatasyncs, COUNT),
                ("journal.segments", s.journal_segments, GAUGE),
                ("read_back.reads", s.read_back_reads, COUNT),
                ("read_back.records", s.read_back_records, COUNT),
                ("messages_published", s.messages_published, COUNT),
                ("messages_confirmed", s.confirms, COUNT),
                ("messages_delivered", s.messages_delivered, COUNT),
                ("messages_acked", s.messages_acked, COUNT),
                ("messages_nacked", s.messages_nacked, COUNT),
                ("messages_expired", s.messages_expired, COUNT),
                ("mesh_outgoing_bytes", s.mesh_outgoing_bytes, GAUGE),
                ("work_bytes", s.work_bytes, GAUGE),
                ("journal.disk_bytes", s.journal_disk_bytes, GAUGE),
                (
                    "journal.segments_reclaimed",
                    s.journal_segments_reclaimed,
                    COUNT,
                ),
            ];
            let hits = s
                .limit_hits
                .iter()
                .map(|(limit, n)| (format!("limit_hit.{limit}"), *n, COUNT));
            let named = fields.iter().map(|(n, v, g)| (n.to_string(), *v, *g));
            for (name, value, gauge) in named.chain(hits) {
                let mut c = wire::CounterT::default();
                c.name = format!("shard.{}.{name}", s.shard);
                c.value = value;
                c.gauge = gauge;
                counters.push(c);
            }
            for h in &s.histograms {
                let mut w = wire::HistogramT::default();
                w.name = h.name.to_string();
                w.shard = s.shard;
                w.count = h.count;
                w.sum = h.sum;
                w.bucket_le = Some(h.buckets.iter().map(|b| b.0).collect());
                w.bucket_count = Some(h.buckets.iter().map(|b| b.1).collect());
                w.p50 = h.p50;
                w.p99 = h.p99;
                w.p999 = h.p999;
                w.max = h.max;
                histograms.push(w);
            }
        }
        st.counters = Some(counters);
        st.histograms = Some(histograms);
        st
    }
}
