//! The `weir` command: the broker and its tools.

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
    /// Decode a file of length-prefixed weir frames (`-` for stdin) and print each frame.
    Inspect {
        /// The file to read; `-` reads standard input.
        file: PathBuf,
    },
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect { file } => inspect(&file),
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
