//! Setup and teardown on the broker: the scenario's queues, exchange and bindings.
//!
//! Contract: runs on the coordinator (main) thread with its admin `Client`, before any load
//! thread starts (`declare`) and after every one has been joined (`cleanup`); `--chaos`
//! (`crate::chaos`) uses the same two, so both modes name and declare alike. It owns the
//! naming of what a run creates (`<prefix>-<i>`, `<prefix>-requests`, `<prefix>-<kind>`).
//!
//! Faults handled: a declaration or binding the broker refuses ends the run before it starts,
//! naming what failed; a scenario queue that already holds messages is refused (the loss check
//! needs fresh queues); deletions that fail at the end are reported on stderr, not fatal.

use weir_client::{Client, ExchangeKind, ExchangeOptions, QueueOptions};

use super::RunConfig;
use crate::scenario::{ExchangeType, Kind};

/// Declares the scenario's queues (and fanout exchange); returns the queue names by index and
/// the exchange name ("" when there is none).
pub(crate) async fn declare(
    admin: &Client,
    cfg: &RunConfig,
) -> Result<(Vec<String>, String), String> {
    let s = &cfg.scenario;
    let options = QueueOptions {
        durable: s.durable,
        ..QueueOptions::default()
    };
    let mut names = Vec::new();
    match s.kind {
        Kind::Queue
        | Kind::Max
        | Kind::DrainAfterRestart
        | Kind::ExactlyOnce
        | Kind::Retry
        | Kind::Priority => {
            for i in 0..s.queues {
                let name = format!("{}-{i}", cfg.prefix);
                let info = admin
                    .declare(&name, options.clone())
                    .await
                    .map_err(|e| format!("declaring queue {name}: {e}"))?;
                if info.messages_ready + info.messages_unacked > 0 {
                    return Err(format!(
                        "queue {name} already holds {} messages: the loss check needs fresh queues \
                         (use another --queue-prefix, or purge it)",
                        info.messages_ready + info.messages_unacked
                    ));
                }
                names.push(name);
            }
            let Some(x) = &s.exchange else {
                return Ok((names, String::new()));
            };
            let (kind, word) = match x.kind {
                ExchangeType::Direct => (ExchangeKind::Direct, "direct"),
                ExchangeType::Topic => (ExchangeKind::Topic, "topic"),
            };
            let exchange = format!("{}-{word}", cfg.prefix);
            admin
                .declare_exchange(
                    &exchange,
                    kind,
                    ExchangeOptions {
                        durable: s.durable,
                        ..ExchangeOptions::default()
                    },
                )
                .await
                .map_err(|e| format!("declaring exchange {exchange}: {e}"))?;
            for (i, name) in names.iter().enumerate() {
                let key = &x.binding_keys[i % x.binding_keys.len()];
                admin
                    .bind(name, &exchange, key)
                    .await
                    .map_err(|e| format!("binding {name} to {exchange} with '{key}': {e}"))?;
            }
            Ok((names, exchange))
        }
        Kind::Rpc => {
            let name = format!("{}-requests", cfg.prefix);
            admin
                .declare(&name, options)
                .await
                .map_err(|e| format!("declaring queue {name}: {e}"))?;
            Ok((vec![name], String::new()))
        }
        Kind::Fanout => {
            let exchange = format!("{}-fanout", cfg.prefix);
            admin
                .declare_exchange(
                    &exchange,
                    ExchangeKind::Fanout,
                    ExchangeOptions {
                        durable: s.durable,
                        ..ExchangeOptions::default()
                    },
                )
                .await
                .map_err(|e| format!("declaring exchange {exchange}: {e}"))?;
            for _ in 0..s.queues {
                // Server-named, as subscribers usually are.
                let name = admin
                    .declare("", options.clone())
                    .await
                    .map_err(|e| format!("declaring a server-named queue: {e}"))?
                    .name;
                admin
                    .bind(&name, &exchange, "")
                    .await
                    .map_err(|e| format!("binding {name} to {exchange}: {e}"))?;
                names.push(name);
            }
            Ok((names, exchange))
        }
    }
}

pub(crate) async fn cleanup(admin: &Client, cfg: &RunConfig, queues: &[String], exchange: &str) {
    if cfg.keep_queues {
        return;
    }
    for q in queues {
        if let Err(e) = admin.delete(q, false, false).await {
            eprintln!("weir-loadgen: deleting queue {q}: {e}");
        }
    }
    if !exchange.is_empty() {
        if let Err(e) = admin.delete_exchange(exchange, false).await {
            eprintln!("weir-loadgen: deleting exchange {exchange}: {e}");
        }
    }
}
