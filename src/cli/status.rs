//! `weir status`: the broker's version and shards (from `Welcome`), its uptime, connections and
//! counters (`GetStatus`), every queue with its depths and consumers (`ListQueues`, all pages),
//! per-shard and overall totals.
//!
//! Contract: tokio current-thread runtime, one connection, read-only. A broker that does not
//! answer `GetStatus` still gets a status page, without uptime, connections and counters.
//! Failures reported: unreachable broker, a lost connection, no answer within `REQUEST_TIMEOUT`.

use std::process::ExitCode;

use serde_json::json;
use weir_client::QueueInfo;

use super::output::{print, queue_json, queue_table, Table};
use super::queue::close;
use super::{answer, block_on, connect, ClientArgs, Failure};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn run(args: StatusArgs) -> ExitCode {
    block_on("status", status(args))
}

#[derive(Default, Clone, Copy)]
struct Totals {
    queues: u64,
    ready: u64,
    unacked: u64,
    bytes_ready: u64,
    consumers: u64,
}

impl Totals {
    fn add(&mut self, q: &QueueInfo) {
        self.queues += 1;
        self.ready += q.messages_ready;
        self.unacked += q.messages_unacked;
        self.bytes_ready += q.bytes_ready;
        self.consumers += u64::from(q.consumers);
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "queues": self.queues,
            "messages_ready": self.ready,
            "messages_unacked": self.unacked,
            "bytes_ready": self.bytes_ready,
            "consumers": self.consumers,
        })
    }
}

async fn status(args: StatusArgs) -> Result<(), Failure> {
    let client = connect(&args.client, false).await?;
    let queues = answer("listing queues", client.list_queues("")).await?;
    let broker = answer("asking for status", client.status()).await.ok();
    let server = client.server().clone();
    close(client).await;

    let shard_count = usize::from(server.shard_count).max(server.shard_ports.len());
    let mut shards = vec![Totals::default(); shard_count];
    let mut totals = Totals::default();
    for q in &queues {
        totals.add(q);
        if let Some(s) = shards.get_mut(usize::from(q.shard)) {
            s.add(q);
        }
    }
    let durability = format!("{:?}", server.durability).to_lowercase();

    let mut human = format!(
        "broker      weir {} at {} (protocol {})\n\
         durability  {durability} (what a confirm of a persistent message means)\n\
         shards      {}\n\n",
        server.broker_version, args.client.server, server.protocol_version, server.shard_count
    );
    if let Some(b) = &broker {
        // Every shard holds a copy of the routing table: shard 0's counts are the broker's.
        let counter = |name: &str| b.counters.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        let unroutable: u64 = b
            .counters
            .iter()
            .filter(|(k, _)| k.ends_with(".messages_unroutable"))
            .map(|(_, v)| v)
            .sum();
        human.push_str(&format!(
            "uptime      {:.1} s\nconnections {}\nexchanges   {}, bindings {}\nunroutable  {unroutable} messages dropped (routed to no queue, not mandatory)\n\n",
            b.uptime_ms as f64 / 1000.0,
            b.connections,
            counter("shard.0.exchanges").unwrap_or(0),
            counter("shard.0.bindings").unwrap_or(0),
        ));
    }
    let mut t = Table::new(&[
        ("SHARD", false),
        ("PORT", true),
        ("QUEUES", true),
        ("READY", true),
        ("UNACKED", true),
        ("CONSUMERS", true),
    ]);
    let port = |i: usize| server.shard_ports.get(i).map(u16::to_string);
    for (i, s) in shards.iter().enumerate() {
        t.row(vec![
            i.to_string(),
            port(i).unwrap_or_else(|| "-".into()),
            s.queues.to_string(),
            s.ready.to_string(),
            s.unacked.to_string(),
            s.consumers.to_string(),
        ]);
    }
    t.row(vec![
        "total".into(),
        String::new(),
        totals.queues.to_string(),
        totals.ready.to_string(),
        totals.unacked.to_string(),
        totals.consumers.to_string(),
    ]);
    human.push_str(&t.render());
    human.push('\n');
    if queues.is_empty() {
        human.push_str("no queues\n");
    } else {
        human.push_str(&queue_table(&queues));
    }

    let shards_json: Vec<_> = shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut v = s.json();
            v["shard"] = json!(i);
            v["port"] = json!(server.shard_ports.get(i));
            v
        })
        .collect();
    let value = json!({
        "server": args.client.server,
        "broker_version": server.broker_version,
        "protocol_version": server.protocol_version,
        "durability": durability,
        "shard_count": server.shard_count,
        "shards": shards_json,
        "queues": queues.iter().map(queue_json).collect::<Vec<_>>(),
                "totals": totals.json(),
        "uptime_ms": broker.as_ref().map(|b| b.uptime_ms),
        "connections": broker.as_ref().map(|b| b.connections),
        "counters": broker
            .as_ref()
            .map(|b| b.counters.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()),
    });
    print(args.client.json, &human, &value)
}
