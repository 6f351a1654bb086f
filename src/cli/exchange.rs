//! `weir exchange declare|delete|list|bindings`, `weir bind`, `weir unbind`: one request each,
//! on one connection.
//!
//! Contract: tokio current-thread runtime (`super::block_on`); each command connects, sends its
//! request, waits at most `REQUEST_TIMEOUT` for the answer, prints it and closes. A bind's
//! answer means every shard routes by it. Failures reported: unreachable broker, the broker's
//! refusals in its own words (`exchange 'x' not found`, a redeclare with another kind, a
//! reserved name, `if_unused` not met), a lost connection, a name over a broker limit (exit 2).

use std::process::ExitCode;

use serde_json::json;
use weir_client::{BindingInfo, ExchangeInfo, ExchangeKind, ExchangeOptions};

use super::output::{print, Table};
use super::queue::close;
use super::{answer, block_on, connect, ClientArgs};

#[derive(clap::Subcommand, Debug)]
pub enum ExchangeCommand {
    /// Create an exchange, or check that one of the same kind and flags exists.
    ///
    /// Kinds: direct (binding key equals routing key), topic (`.`-separated words; `*` one
    /// word, `#` zero or more), fanout (every bound queue). Without --durable it is gone after
    /// a broker restart. Names starting with `weir.` are reserved. --json: the exchange as
    /// {"name","kind","durable","auto_delete","bindings"}.
    Declare {
        /// The exchange's name.
        name: String,
        /// direct, topic or fanout.
        #[arg(long = "type", value_name = "KIND", default_value = "direct")]
        kind: ExchangeKind,
        /// Keep the exchange, and its bindings to durable queues, across broker restarts.
        #[arg(long)]
        durable: bool,
        /// Deleted when its last binding goes.
        #[arg(long)]
        auto_delete: bool,
        /// Only check that it exists with this kind.
        #[arg(long)]
        passive: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete an exchange and its bindings.
    ///
    /// --json: {"exchange","deleted":true}.
    Delete {
        /// The exchange's name.
        name: String,
        /// Only if nothing is bound to it.
        #[arg(long)]
        if_unused: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List exchanges in name order: kind, durable, auto-delete, bindings. The default exchange
    /// `""` (every queue bound by its name) is not listed.
    ///
    /// --json: one JSON array of exchange objects (as `exchange declare`), on one line.
    List {
        /// Only exchanges whose name starts with this.
        #[arg(long, value_name = "P", default_value = "")]
        prefix: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List bindings, sorted by exchange, queue and key; optionally of one exchange or queue.
    ///
    /// --json: one JSON array of {"exchange","queue","binding_key"}, on one line.
    Bindings {
        /// Only bindings from this exchange.
        exchange: Option<String>,
        /// Only bindings to this queue.
        #[arg(long, value_name = "NAME")]
        queue: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `weir bind` and `weir unbind`.
#[derive(clap::Args, Debug)]
pub struct BindArgs {
    /// The queue messages go to.
    pub queue: String,
    /// The exchange they are published to.
    pub exchange: String,
    /// The binding key: a routing key (direct), a pattern (topic); ignored by fanout.
    #[arg(long, value_name = "KEY", default_value = "")]
    pub key: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn run(command: ExchangeCommand) -> ExitCode {
    match command {
        ExchangeCommand::Declare {
            name,
            kind,
            durable,
            auto_delete,
            passive,
            client,
        } => {
            let options = ExchangeOptions {
                durable,
                auto_delete,
                passive,
            };
            block_on("exchange declare", async move {
                let c = connect(&client, false).await?;
                answer(
                    &format!("declaring exchange '{name}'"),
                    c.declare_exchange(&name, kind, options),
                )
                .await?;
                // The declare's answer has no description: the list (filtered to this one)
                // gives its binding count and, for a passive declare, its real flags.
                let listed = answer("listing exchanges", c.list_exchanges(&name)).await?;
                close(c).await;
                let info = listed
                    .into_iter()
                    .find(|e| e.name == name)
                    .unwrap_or(ExchangeInfo {
                        name: name.clone(),
                        kind: Some(kind),
                        durable,
                        auto_delete,
                        bindings: 0,
                    });
                let human = format!(
                    "exchange '{}': {}, {}{}, {} bindings\n",
                    info.name,
                    kind_name(&info),
                    if info.durable { "durable" } else { "transient" },
                    if info.auto_delete {
                        ", auto-delete"
                    } else {
                        ""
                    },
                    info.bindings
                );
                print(client.json, &human, &exchange_json(&info))
            })
        }
        ExchangeCommand::Delete {
            name,
            if_unused,
            client,
        } => block_on("exchange delete", async move {
            let c = connect(&client, false).await?;
            answer(
                &format!("deleting exchange '{name}'"),
                c.delete_exchange(&name, if_unused),
            )
            .await?;
            close(c).await;
            print(
                client.json,
                &format!("deleted exchange '{name}'\n"),
                &json!({"exchange": name, "deleted": true}),
            )
        }),
        ExchangeCommand::List { prefix, client } => block_on("exchange list", async move {
            let c = connect(&client, false).await?;
            let exchanges = answer("listing exchanges", c.list_exchanges(&prefix)).await?;
            close(c).await;
            let human = if exchanges.is_empty() {
                "no exchanges\n".to_string()
            } else {
                let mut t = Table::new(&[
                    ("NAME", false),
                    ("KIND", false),
                    ("DURABLE", false),
                    ("AUTO-DELETE", false),
                    ("BINDINGS", true),
                ]);
                for e in &exchanges {
                    t.row(vec![
                        e.name.clone(),
                        kind_name(e).to_string(),
                        yes_no(e.durable),
                        yes_no(e.auto_delete),
                        e.bindings.to_string(),
                    ]);
                }
                t.render()
            };
            let all: Vec<_> = exchanges.iter().map(exchange_json).collect();
            print(client.json, &human, &serde_json::Value::Array(all))
        }),
        ExchangeCommand::Bindings {
            exchange,
            queue,
            client,
        } => block_on("exchange bindings", async move {
            let c = connect(&client, false).await?;
            let bindings = answer(
                "listing bindings",
                c.list_bindings(exchange.as_deref(), queue.as_deref()),
            )
            .await?;
            close(c).await;
            let human = if bindings.is_empty() {
                "no bindings\n".to_string()
            } else {
                let mut t = Table::new(&[("EXCHANGE", false), ("QUEUE", false), ("KEY", false)]);
                for b in &bindings {
                    t.row(vec![
                        b.exchange.clone(),
                        b.queue.clone(),
                        b.binding_key.clone(),
                    ]);
                }
                t.render()
            };
            let all: Vec<_> = bindings.iter().map(binding_json).collect();
            print(client.json, &human, &serde_json::Value::Array(all))
        }),
    }
}

/// `weir bind` (`bind = true`) or `weir unbind`.
pub fn run_bind(args: BindArgs, bind: bool) -> ExitCode {
    let name = if bind { "bind" } else { "unbind" };
    block_on(name, async move {
        let BindArgs {
            queue,
            exchange,
            key,
            client,
        } = args;
        let c = connect(&client, false).await?;
        let doing = format!("{name}ing queue '{queue}' and exchange '{exchange}'");
        if bind {
            answer(&doing, c.bind(&queue, &exchange, &key)).await?;
        } else {
            answer(&doing, c.unbind(&queue, &exchange, &key)).await?;
        }
        close(c).await;
        let human = format!(
            "{} queue '{queue}' {} exchange '{exchange}' with key '{key}'\n",
            if bind { "bound" } else { "unbound" },
            if bind { "to" } else { "from" }
        );
        let value = json!({
            "exchange": exchange,
            "queue": queue,
            "binding_key": key,
            "bound": bind,
        });
        print(client.json, &human, &value)
    })
}

fn kind_name(e: &ExchangeInfo) -> &'static str {
    e.kind.map_or("unknown", ExchangeKind::name)
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn exchange_json(e: &ExchangeInfo) -> serde_json::Value {
    json!({
        "name": e.name,
        "kind": kind_name(e),
        "durable": e.durable,
        "auto_delete": e.auto_delete,
        "bindings": e.bindings,
    })
}

fn binding_json(b: &BindingInfo) -> serde_json::Value {
    json!({"exchange": b.exchange, "queue": b.queue, "binding_key": b.binding_key})
}
