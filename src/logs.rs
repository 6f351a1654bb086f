//! `weir serve`'s log: a `tracing` subscriber on stderr, as text or JSON lines, filtered by
//! `RUST_LOG` (default `info`).
//!
//! Contract: `init` runs once on the main thread, after the configuration is loaded and before
//! any shard starts. Every event carries the spans it happened in: `shard{shard=N}` on a shard's
//! thread (each task a shard spawns inherits it, `rt::spawn`) and `connection{connection=ID}`
//! inside a connection's task, so every line of one connection says which it was. Faults
//! handled: a `RUST_LOG` that does not parse is refused, naming the directive that is wrong,
//! and `weir serve` exits 2 instead of logging at a level nobody asked for (a typo would
//! otherwise hide the very lines it was meant to show).

use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::filter::{Directive, EnvFilter};

use crate::config::LogFormat;

/// The filter when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info";

/// The filter `rust_log` (the variable's value, `None` when unset) asks for, or why it cannot
/// be one, naming the first bad directive.
pub fn filter(rust_log: Option<&str>) -> Result<EnvFilter, String> {
    let Some(text) = rust_log else {
        return Ok(EnvFilter::new(DEFAULT_FILTER));
    };
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if let Err(e) = Directive::from_str(directive) {
            return Err(format!(
                "RUST_LOG: directive '{directive}' is not valid ({e}); write e.g. \
                 RUST_LOG=info or RUST_LOG=warn,weir=debug (levels: error, warn, info, debug, trace)"
            ));
        }
    }
    EnvFilter::builder()
        .parse(text)
        .map_err(|e| format!("RUST_LOG: '{text}' is not valid: {e}"))
}

/// Installs the subscriber: `format` on stderr, filtered by `rust_log`.
pub fn init(format: LogFormat, rust_log: Option<&str>) -> Result<(), String> {
    let filter = filter(rust_log)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    installed.map_err(|e| format!("cannot install the log subscriber: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_directive_is_named() {
        assert!(filter(None).is_ok());
        assert!(filter(Some("warn,weir=debug")).is_ok());
        let err = filter(Some("info,weir=loud")).unwrap_err();
        assert!(err.contains("'weir=loud'"), "{err}");
    }
}
