//! weir-loadgen: load-leveling workloads against a weir broker, measured with HDR histograms.
//!
//! The workloads (steady, spike, sawtooth, diurnal, drain, fanout, rpc, max) arrive with the
//! load-generator work; until then this binary says so instead of pretending to measure.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "weir-loadgen {}: no workloads yet (speaks weir protocol {}); see ARCHITECTURE.md",
        env!("CARGO_PKG_VERSION"),
        weir_protocol::PROTOCOL_VERSION
    );
    ExitCode::from(2)
}
