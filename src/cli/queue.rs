//! `weir queue declare|delete|purge|info|list`: one request each, on one connection.
//!
//! Contract: tokio current-thread runtime (`super::block_on`); each command connects, sends its
//! request, waits at most `REQUEST_TIMEOUT` for the answer, prints it and closes. Failures
//! reported: unreachable broker, the broker's refusals in its own words (`queue 'x' not found`,
//! a redeclare with other properties, `if_unused`/`if_empty` not met), a lost connection, a
//! name over the broker's length limit (exit 2).

use std::process::ExitCode;

use serde_json::json;
use weir_client::{Client, Overflow, QueueArguments, QueueOptions};

use super::output::{print, queue_block, queue_json, queue_table};
use super::{answer, block_on, connect, ClientArgs};

#[derive(clap::Subcommand, Debug)]
pub enum QueueCommand {
    /// Create a queue, or check that one with the same properties exists; prints it.
    ///
    /// Without --durable the queue is transient: it and its messages are gone after a broker
    /// restart. An --exclusive queue belongs to this command's connection, so it is deleted
    /// when the command exits. --json: the queue as one JSON object (as `queue info`).
    Declare {
        /// The queue's name.
        name: String,
        /// Keep the queue and its persistent messages across broker restarts.
        #[arg(long)]
        durable: bool,
        /// Only this connection may use it; deleted when the connection closes.
        #[arg(long)]
        exclusive: bool,
        /// Deleted when its last consumer goes.
        #[arg(long)]
        auto_delete: bool,
        #[command(flatten)]
        arguments: QueueArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a queue and its messages; prints how many messages went with it.
    ///
    /// --json: {"queue","deleted":true,"messages"}.
    Delete {
        /// The queue's name.
        name: String,
        /// Only if no consumer is attached.
        #[arg(long)]
        if_unused: bool,
        /// Only if it holds no message.
        #[arg(long)]
        if_empty: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove every ready message of a queue (unacked ones stay); prints how many.
    ///
    /// --json: {"queue","purged"}.
    Purge {
        /// The queue's name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Describe one queue: shard, depths, consumers, age of the oldest ready message.
    ///
    /// --json: one object {"name","shard","durable","exclusive","auto_delete","messages_ready",
    /// "messages_unacked","messages_delayed","bytes_ready","consumers","oldest_ready_age_ms",
    /// ..., "expires_in_ms","active_consumer","messages_retrying","retry_delays_ms"} and the
    /// queue's arguments ..., "priority_max"} (null when absent).
    Info {
        /// The queue's name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List queues in name order: shard, durable, ready, unacked, consumers, oldest ready age.
    ///
    /// --json: one JSON array of queue objects (as `queue info`), on one line.
    List {
        /// Only queues whose name starts with this.
        #[arg(long, value_name = "P", default_value = "")]
        prefix: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// A queue's optional behaviour, fixed when it is declared (`weir queue declare`).
#[derive(clap::Args, Debug)]
pub struct QueueArgs {
    /// Time to live of every message, ms from when the queue accepts it.
    #[arg(long, value_name = "MS")]
    message_ttl_ms: Option<u32>,
    /// Most ready messages (see --overflow).
    #[arg(long, value_name = "N")]
    max_length: Option<u64>,
    /// Most bytes of ready messages (see --overflow).
    #[arg(long, value_name = "BYTES")]
    max_length_bytes: Option<u64>,
    /// Past a maximum: drop-head (the oldest go, dead-lettered if the queue says so) or
    /// reject-publish (the new one is refused).
    #[arg(long, value_name = "POLICY", default_value = "drop-head", value_parser = ["drop-head", "reject-publish"])]
    overflow: String,
    /// Deliveries after which an unacked message is dead-lettered (or dropped) instead of
    /// redelivered. N counts every delivery, the first included: RabbitMQ's delivery-limit N
    /// allows N redeliveries (N + 1 deliveries), so its N is weir's N + 1.
    #[arg(long, value_name = "N")]
    max_deliveries: Option<u32>,
    /// Exchange that receives the messages this queue gives up on (rejected without requeue,
    /// expired, pushed out, past --max-deliveries); "" is the default exchange.
    #[arg(long, value_name = "EXCHANGE")]
    dead_letter_exchange: Option<String>,
    /// Routing key for dead-lettered messages (default: their own).
    #[arg(long, value_name = "KEY", requires = "dead_letter_exchange")]
    dead_letter_routing_key: Option<String>,
    /// Delete the queue, with its messages, once it has been unused this long, ms (no
    /// consumers, no get, no redeclare; publishing is not a use). Kept across restarts.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(1..))]
    expires_ms: Option<u32>,
    /// Only one consumer receives at a time (the highest --priority, the earliest among
    /// equals); the next takes over when it goes.
    #[arg(long)]
    single_active_consumer: bool,
    /// Retry policy: a delivery nacked or rejected with requeue comes back after the n-th of
    /// these delays (ms) on its n-th failure; after the last one its next failure dead-letters
    /// it (or drops it without --dead-letter-exchange). E.g. 1000,5000,30000.
    #[arg(long, value_name = "MS,MS,..", value_delimiter = ',')]
    retry_delays_ms: Vec<u32>,
    /// Make it a priority queue: messages of higher priority (weir publish --priority) are
    /// delivered first, FIFO within one; a message's priority is capped at N (1 to 255; a few
    /// levels, as RabbitMQ recommends, are as cheap as many).
    #[arg(long, value_name = "N", default_value_t = 0)]
    priority_max: u8,
}

impl QueueArgs {
    fn to_arguments(&self) -> QueueArguments {
        QueueArguments {
            message_ttl_ms: self.message_ttl_ms,
            max_length: self.max_length,
            max_length_bytes: self.max_length_bytes,
            overflow: if self.overflow == "reject-publish" {
                Overflow::RejectPublish
            } else {
                Overflow::DropHead
            },
            max_deliveries: self.max_deliveries,
            dead_letter_exchange: self.dead_letter_exchange.clone(),
            dead_letter_routing_key: self.dead_letter_routing_key.clone(),
            expires_ms: self.expires_ms,
            single_active_consumer: self.single_active_consumer,
            retry_delays_ms: self.retry_delays_ms.clone(),
            priority_max: self.priority_max,
            ..QueueArguments::default()
        }
    }
}

pub fn run(command: QueueCommand) -> ExitCode {
    match command {
        QueueCommand::Declare {
            name,
            durable,
            exclusive,
            auto_delete,
            arguments,
            client,
        } => {
            let options = QueueOptions {
                durable,
                exclusive,
                auto_delete,
                arguments: arguments.to_arguments(),
                ..QueueOptions::default()
            };
            block_on("queue declare", async move {
                let c = connect(&client, false).await?;
                let info = answer(
                    &format!("declaring queue '{name}'"),
                    c.declare(&name, options),
                )
                .await?;
                close(c).await;
                print(client.json, &queue_block(&info), &queue_json(&info))
            })
        }
        QueueCommand::Delete {
            name,
            if_unused,
            if_empty,
            client,
        } => block_on("queue delete", async move {
            let c = connect(&client, false).await?;
            let messages = answer(
                &format!("deleting queue '{name}'"),
                c.delete(&name, if_unused, if_empty),
            )
            .await?;
            close(c).await;
            print(
                client.json,
                &format!("deleted queue '{name}' ({messages} messages)\n"),
                &json!({"queue": name, "deleted": true, "messages": messages}),
            )
        }),
        QueueCommand::Purge { name, client } => block_on("queue purge", async move {
            let c = connect(&client, false).await?;
            let messages = answer(&format!("purging queue '{name}'"), c.purge(&name)).await?;
            close(c).await;
            print(
                client.json,
                &format!("purged {messages} messages from queue '{name}'\n"),
                &json!({"queue": name, "purged": messages}),
            )
        }),
        QueueCommand::Info { name, client } => block_on("queue info", async move {
            let c = connect(&client, false).await?;
            let info = answer(&format!("describing queue '{name}'"), c.queue_info(&name)).await?;
            close(c).await;
            print(client.json, &queue_block(&info), &queue_json(&info))
        }),
        QueueCommand::List { prefix, client } => block_on("queue list", async move {
            let c = connect(&client, false).await?;
            let queues = answer("listing queues", c.list_queues(&prefix)).await?;
            close(c).await;
            let human = if queues.is_empty() && !prefix.is_empty() {
                format!("no queue starts with '{prefix}'\n")
            } else if queues.is_empty() {
                "no queues\n".to_string()
            } else {
                queue_table(&queues)
            };
            let all: Vec<_> = queues.iter().map(queue_json).collect();
            print(client.json, &human, &serde_json::Value::Array(all))
        }),
    }
}

/// An orderly goodbye, bounded: the answer is in hand, so a slow close must not fail the
/// command (dropping the client closes the sockets anyway).
pub(crate) async fn close(client: Client) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.close()).await;
}
