//! `weir data`: offline tools for a data directory no broker is serving.
//!
//! Contract: runs on the main thread, starts no broker and no tokio runtime; `reshard` runs the
//! journals' own code on one glommio executor (`crate::reshard`). Its configuration is loaded as
//! `weir serve` loads it (`--config`/`WEIR_CONFIG`, then `WEIR_*`, then flags), so the new
//! journals are written with the limits the broker will read them with. Exit codes: 0 done (or
//! nothing to do), 1 the operation failed (the old layout stands), 2 a usage or configuration
//! error.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, Flags};
use crate::reshard::{self, Outcome};

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Move every queue of a data directory to a new shard count (for a broker that will run
    /// on another number of CPUs), while no broker serves it.
    ///
    /// Every durable queue, its messages (in order, with delivery times, priorities, retry
    /// state, dead-letter histories), its sequence numbers, the exchanges and bindings, and
    /// idempotent producers' windows move to their new owners; unacked deliveries come back
    /// ready, as after any restart. Crash-safe: killed at any moment, the directory holds the
    /// old layout or the new one, never a mix; run it again to finish. Prints what each new
    /// shard received.
    Reshard(ReshardArgs),
}

#[derive(clap::Args, Debug)]
pub struct ReshardArgs {
    /// The data directory (as `weir serve --data-dir`).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The new shard count: the number of CPUs the broker will run on.
    #[arg(long, value_name = "N")]
    shards: usize,
    /// The broker's configuration file (its limits shape the journals written).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub fn run(command: DataCommand) -> ExitCode {
    match command {
        DataCommand::Reshard(args) => run_reshard(args),
    }
}

fn run_reshard(args: ReshardArgs) -> ExitCode {
    let flags = Flags {
        config: args.config,
        data_dir: args.data_dir,
        ..Flags::default()
    };
    let config = match Config::load(&flags, |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weir data reshard: bad configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let dir = config.data_dir.display().to_string();
    match reshard::reshard(&config, args.shards) {
        Ok(Outcome::Unchanged { shards }) => {
            println!("data directory {dir} already has {shards} shards: nothing to do");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Moved {
            from,
            to,
            generation,
            shards,
            exchanges,
            bindings,
            producers,
        }) => {
            println!(
                "data directory {dir}: resharded from {from} to {to} shards (layout generation \
                 {generation})"
            );
            for (k, m) in shards.iter().enumerate() {
                println!(
                    "shard {k}: {} queues, {} messages, {} bytes",
                    m.queues, m.messages, m.bytes
                );
            }
            println!(
                "control plane (shard 0): {exchanges} durable exchanges, {bindings} durable \
                 bindings; {producers} idempotent producers' windows on every shard"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weir data reshard: {e}");
            ExitCode::from(1)
        }
    }
}
