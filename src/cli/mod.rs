//! The client commands of the `weir` binary: `queue`, `exchange`, `bind`, `unbind`,
//! `publish`, `consume`, `status`, `top`.
//!
//! Contract: each command runs on a tokio current-thread runtime built for that one command
//! (glommio is `weir serve`'s alone: a client command starts no shard) and talks to the broker
//! only through weir-client. Results go to stdout, as text for a person or, with `--json`, as
//! JSON for scripts (each command's `--help` says which shape). A failure is one line on stderr,
//! `weir <command>: <what failed>`, and the exit code says what kind: 0 done, 1 the operation
//! failed (broker unreachable, a refusal, a lost connection, stdout unwritable), 2 a usage error
//! (clap's own errors also exit 2, a malformed `--server`, an argument over a broker limit).
//!
//! Module map: `queue` (declare, delete, purge, info, list), `exchange` (declare, delete, list,
//! bindings; bind, unbind), `publish`, `consume`, `status`, `top` (the live view);
//! `output` (tables, JSON values, stdout writes that report errors instead of panicking);
//! `data` (`weir data reshard`: offline, on a data directory no broker holds; no tokio, no
//! client; `main.rs` registers it beside `serve`).

pub mod consume;
pub mod data;
pub mod exchange;
mod output;
pub mod publish;
pub mod queue;
pub mod status;
pub mod top;

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use weir_client::{Client, ClientError, ClientOptions, CloseReason, ErrorCode};

/// The broker's default address (`weir serve` with no options).
pub const DEFAULT_SERVER: &str = "127.0.0.1:5680";

/// Longest wait for one answer to an administrative request (declare, list, ...): a broker that
/// accepted the connection but never answers must not hang a script.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The client commands; `main.rs` flattens these into `weir`'s subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Declare, delete, purge, describe and list queues.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// Declare, delete and list exchanges, and list bindings.
    #[command(subcommand)]
    Exchange(exchange::ExchangeCommand),
    /// Bind a queue to an exchange with a key; idempotent. Answered once every shard routes by
    /// it.
    ///
    /// --json: {"exchange","queue","binding_key","bound":true}.
    Bind(exchange::BindArgs),
    /// Remove a binding (one that does not exist is not an error).
    ///
    /// --json: {"exchange","queue","binding_key","bound":false}.
    Unbind(exchange::BindArgs),
    /// Publish messages (persistent unless --non-persistent; with --priority, --header,
    /// --expiration-ms, --delay-ms) to a queue, or to an exchange with a routing key: each line
    /// of standard input, or --message.
    ///
    /// Lines are published in order, pipelined in batches; the command waits for every confirm,
    /// then prints a summary: published (attempted), confirmed, refused (with the reasons).
    /// The trailing "\n" (or "\r\n") of each line is not part of the message; a last line
    /// without one is still a message. Exits 1 if any message was not confirmed (with
    /// --mandatory, a message that routed to no queue counts as refused), or at once if the
    /// queue or exchange does not exist. A non-mandatory message that routes nowhere is
    /// confirmed and dropped (counted in `weir status`).
    ///
    /// --json: the summary as one JSON object on one line:
    /// {"queue" or "exchange" and "routing_key","published","confirmed","refused","unconfirmed","durability","refusals":[{"reason","count"}]}
    /// (with --producer-id also "producer_id","sequence_start","duplicates").
    ///
    /// With --producer-id N the messages are an idempotent producer's, numbered from
    /// --sequence-start: the broker stores each (N, sequence) at most once per queue, so the
    /// same command run twice stores its lines once (the second run's confirms are duplicates).
    Publish(publish::PublishArgs),
    /// Print the messages of a queue, one body per line, acking each after it is written (or
    /// with --nack / --reject, settling it so: dead-lettered or dropped, or with --requeue back
    /// to the queue).
    ///
    /// Bodies are written as they are (bytes; a body containing "\n" spans lines). With --count
    /// N it stops after N messages; otherwise it runs until Ctrl-C or SIGTERM, then acks what
    /// it printed and exits 0. A message is acked only after its line reached stdout, so one
    /// that could not be written goes back to the queue. If stdout is closed, it stops the
    /// same way and exits 0. Caution: a line written into a pipe counts as printed, so a reader
    /// that exits early (`| head -3`) drops the lines it did not read, and they were acked: use
    /// --count N instead. With --count, the last --prefetch messages are acked after the
    /// consumer is cancelled, so the broker never sends more than N.
    ///
    /// --json: one JSON object per message, one per line (JSON Lines):
    /// {"body","delivery_tag","redelivered","delivery_count","routing_key"}, and where set
    /// "headers" ([[key, value], ..]), "priority", "expiration_ms", "deliver_at_ms",
    /// "persistent":false, "deaths"; the body (and each header value) is decoded as UTF-8,
    /// invalid bytes replaced by U+FFFD.
    Consume(consume::ConsumeArgs),
    /// Show the broker: its version, shards and their ports, every queue with its depths and
    /// consumers, and totals.
    ///
    /// --json: one JSON object:
    /// {"server","broker_version","protocol_version","durability","shard_count","shards":[..],
    /// "queues":[..],"totals":{..}}.
    Status(status::StatusArgs),
    /// A live view in the terminal: per shard the journal's commit, record and byte rates, per
    /// queue its depths, consumers, oldest-ready age and depth rates, deepest first; redrawn
    /// every --interval seconds (rates are the difference from the previous sample).
    ///
    /// On a terminal it clears and redraws; into a pipe the frames follow one another. With
    /// --iterations N it stops after N samples. --json: one JSON object per sample, one per
    /// line: {"interval_s","uptime_ms","connections","shards":[..],"queues":[..]}.
    Top(top::TopArgs),
}

/// Runs one client command; returns the process's exit code.
pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Queue(c) => queue::run(c),
        Command::Exchange(c) => exchange::run(c),
        Command::Bind(a) => exchange::run_bind(a, true),
        Command::Unbind(a) => exchange::run_bind(a, false),
        Command::Publish(a) => publish::run(a),
        Command::Consume(a) => consume::run(a),
        Command::Status(a) => status::run(a),
        Command::Top(a) => top::run(a),
    }
}

/// What every client command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// The broker's address, HOST:PORT.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Machine-readable output for scripts (shape in this command's --help); errors stay one
    /// line of text on stderr.
    #[arg(long)]
    pub json: bool,
}

/// Why a command failed: the line for stderr and the exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// A usage or configuration error: exit 2.
    pub(crate) fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }

    /// The operation failed: exit 1.
    pub(crate) fn failed(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }

    /// A client error, with what was being done when it happened unless the broker's own
    /// sentence says it already (refusals name their queue).
    pub(crate) fn client(doing: &str, e: &ClientError) -> Failure {
        let reason = describe(e);
        let message = match e {
            ClientError::Refused { .. } | ClientError::ConsumerCancelled { .. } => reason,
            _ => format!("{doing}: {reason}"),
        };
        match e {
            // Refused locally before anything was sent: the arguments are wrong for this broker.
            ClientError::LimitExceeded { .. } | ClientError::InvalidArgument(_) => {
                Failure::usage(message)
            }
            _ => Failure::failed(message),
        }
    }
}

/// A client error as a person reads it: the broker's sentence for refusals (its code only
/// where the sentence alone leaves the kind unclear), the cause for lost connections.
pub(crate) fn describe(e: &ClientError) -> String {
    match e {
        ClientError::Refused { code, message } if *code == ErrorCode::NotFound => message.clone(),
        ClientError::Refused { code, message } => format!("{message} ({code:?})"),
        ClientError::ConsumerCancelled { code, message, .. } => {
            format!("consumer cancelled by the broker: {message} ({code:?})")
        }
        ClientError::Closed(CloseReason::Local) => "the connection was closed".into(),
        ClientError::Closed(reason) => format!("connection lost: {reason}"),
        ClientError::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// Builds the runtime, runs `body` on it, and turns its outcome into an exit code, printing a
/// failure as `weir <name>: <message>`.
pub(crate) fn block_on<F>(name: &str, body: F) -> ExitCode
where
    F: Future<Output = Result<(), Failure>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weir {name}: cannot start the tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(body) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("weir {name}: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Connects to `--server`. Administrative commands use one connection (the broker forwards to
/// the owning shard, one round trip more, one connect fewer); publish and consume are
/// shard-aware, so their traffic takes no cross-core hop in the broker.
pub(crate) async fn connect(args: &ClientArgs, shard_aware: bool) -> Result<Client, Failure> {
    check_address(&args.server)?;
    let mut options = if shard_aware {
        ClientOptions::default()
    } else {
        ClientOptions::single_connection()
    };
    options.name = format!("weir-cli/{}", std::process::id());
    options.connect_timeout = Duration::from_secs(10);
    Client::connect(args.server.as_str(), options)
        .await
        .map_err(|e| {
            Failure::failed(format!(
                "cannot connect to {}: {}",
                args.server,
                describe(&e)
            ))
        })
}

/// A usage error for an address that cannot be one; names that need resolving are left to
/// the connect, which reports a failed lookup as an operation failure.
fn check_address(server: &str) -> Result<(), Failure> {
    if server.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let valid = match server.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
        }
        None => false,
    };
    if valid {
        Ok(())
    } else {
        Err(Failure::usage(format!(
            "bad --server address '{server}': expected HOST:PORT, e.g. {DEFAULT_SERVER}"
        )))
    }
}

/// Waits for an administrative request, at most `REQUEST_TIMEOUT`.
pub(crate) async fn answer<T>(
    doing: &str,
    request: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::client(doing, &e)),
        Err(_) => Err(Failure::failed(format!(
            "{doing}: no answer from the broker within {}s",
            REQUEST_TIMEOUT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::check_address;

    #[test]
    fn addresses_are_checked_for_shape_only() {
        assert!(check_address("127.0.0.1:5680").is_ok());
        assert!(check_address("[::1]:5680").is_ok());
        assert!(check_address("broker.example:5680").is_ok());
        for bad in ["", "127.0.0.1", ":5680", "host:port", "host:70000", "a b:1"] {
            let f = check_address(bad).unwrap_err();
            assert_eq!(f.code, 2, "{bad}");
            assert!(f.message.contains("HOST:PORT"), "{}", f.message);
        }
    }
}
