//! The `weir` command: the broker (`serve`), its client commands (`queue`, `publish`,
//! `consume`, `status`, `top`, in `weir::cli`), and offline tools (`inspect`, `data reshard`).
//! `serve` loads the configuration first, then installs the log (`weir::logs`, whose format it
//! names); a bad configuration or `RUST_LOG` exits 2 before anything starts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weir", version = version(), about = "A durable, thread-per-core message broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker. With no options: 127.0.0.1:5680, ./weir-data, one shard per allowed CPU,
    /// fsync = always. Options override `--config`/`WEIR_CONFIG`, which override the defaults;
    /// WEIR_LISTEN, WEIR_SHARD_PORT_BASE, WEIR_DATA_DIR, WEIR_CPUS, WEIR_FSYNC and
    /// WEIR_LOG_FORMAT sit in between. ./weir-data is relative to the working directory: a
    /// service should give an absolute --data-dir (the ready line prints the absolute path and
    /// whether the directory was new or recovered).
    Serve(ServeArgs),
    /// Decode a file of length-prefixed weir frames (`-` for stdin) and print each frame.
    Inspect {
        /// The file to read; `-` reads standard input.
        file: PathBuf,
    },
    #[command(flatten)]
    Client(weir::cli::Command),
    /// Offline tools for a data directory no broker is serving (`reshard`: change its shard
    /// count).
    #[command(subcommand)]
    Data(weir::cli::data::DataCommand),
}

static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (protocol {})",
        env!("CARGO_PKG_VERSION"),
        weir_protocol::PROTOCOL_VERSION
    )
});

fn version() -> &'static str {
    VERSION.as_str()
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A TOML configuration file (see tuning/ for profiles).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address every shard accepts on, e.g. 127.0.0.1:5680 (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Shard i also listens on this + i, for shard-aware clients (0: any free ports).
    #[arg(long, value_name = "PORT")]
    shard_port_base: Option<u16>,
    /// The data directory (journals, layout); default ./weir-data, relative to the working
    /// directory.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// CPUs to run shards on: "all", or a list like 0,1.
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
    /// What a confirm of a persistent message means. always (the default): its record is on
    /// disk, the fdatasync of its group commit returned. interval:MS and never: it is staged
    /// for the next group commit, not yet written, so a crash can lose confirmed messages. The
    /// journal still writes and fdatasyncs every group commit at once (about a millisecond),
    /// so today MS is checked and reported but changes nothing, and never promises no bound.
    #[arg(long, value_name = "always|interval:MS|never")]
    fsync: Option<String>,
    /// Log lines on stderr as text (default) or JSON objects, one per line, each with its
    /// shard and connection; RUST_LOG filters them (default info; a bad directive is refused).
    #[arg(long, value_name = "text|json")]
    log_format: Option<String>,
    /// The admin HTTP listener: /metrics, /api/, /health, /ready and the dashboard at /
    /// (default 127.0.0.1:15680; port 0: any free port). Given twice, the last one counts.
    #[arg(long, value_name = "ADDR", overrides_with = "admin_listen")]
    admin_listen: Option<String>,
    /// No admin HTTP listener.
    #[arg(long)]
    no_admin: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Inspect { file } => inspect(&file),
        Command::Client(command) => weir::cli::run(command),
        Command::Data(command) => weir::cli::data::run(command),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let flags = weir::config::Flags {
        config: args.config,
        listen: args.listen,
        shard_port_base: args.shard_port_base,
        data_dir: args.data_dir,
        cpus: args.cpus,
        fsync: args.fsync,
        log_format: args.log_format,
        admin_listen: args.admin_listen,
        no_admin: args.no_admin,
    };
    let config = match weir::config::Config::load(&flags, |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weir serve: bad configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // After the configuration, which names the log format; its errors go to stderr as they are.
    let rust_log = std::env::var("RUST_LOG").ok();
    if let Err(e) = weir::logs::init(config.log_format, rust_log.as_deref()) {
        eprintln!("weir serve: {e}");
        return ExitCode::from(2);
    }
    match weir::server::serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(weir::server::ServeError::Config(e)) => {
            eprintln!("weir serve: bad configuration: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("weir serve: {e}");
            ExitCode::from(1)
        }
    }
}

fn inspect(file: &std::path::Path) -> ExitCode {
    let result = if file.as_os_str() == "-" {
        weir::inspect::inspect(std::io::stdin().lock())
    } else {
        match std::fs::File::open(file) {
            Ok(f) => weir::inspect::inspect(f),
            Err(e) => {
                eprintln!("weir inspect: cannot open {}: {e}", file.display());
                return ExitCode::from(2);
            }
        }
    };
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weir inspect: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    for line in &report.frames {
        println!("{line}");
    }
    if let Some((offset, error)) = &report.error {
        eprintln!("weir inspect: frame at byte {offset}: {error}");
        return ExitCode::from(1);
    }
    if report.trailing_bytes > 0 {
        eprintln!(
            "weir inspect: {} trailing bytes do not form a whole frame",
            report.trailing_bytes
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
