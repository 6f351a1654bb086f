//! weir-loadgen: load-leveling workloads against a weir broker, measured with HDR histograms.
//! What it measures and how: loadgen/README.md.
//!
//! Contract: the main thread parses flags and the scenario, optionally starts a broker
//! (`--spawn-broker`), runs the scenario (`run`: pinned load threads, each its own tokio
//! current-thread runtime), prints the report, writes `--out` files and pictures, and stops the
//! broker. It owns the spawned broker: every exit path, error and Ctrl-C included, stops it and
//! removes its data directory (the broker value's `Drop`). With `--chaos` it also SIGKILLs and
//! restarts that broker during the run (`chaos`), always from this thread; a
//! `drain-after-restart` scenario (`restart`) stops it and starts it again on the same data
//! between a fill and its drain, also from this thread, and only with `--spawn-broker`.
//!
//! Exit codes: 0 the run completed and the check passed; 1 an error (broker unreachable, bad
//! profile, files); 2 bad flags or a refused scenario; 3 a confirmed message was lost; 4 the run
//! did not complete cleanly (the queues never drained, publishes failed, or it was stopped).

mod broker;
mod chaos;
mod exactly_once;
mod plot;
mod priority;
mod report;
mod restart;
mod retry;
mod run;
mod scenario;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;

use crate::broker::{find_weir, SpawnedBroker};
use crate::report::Results;
use crate::run::RunConfig;

const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_LOSS: u8 = 3;
const EXIT_INCOMPLETE: u8 = 4;

/// Drives a workload against a weir broker, open loop, and reports latency percentiles (HDR
/// histograms), throughput, queue depth over time and a loss check.
#[derive(Parser, Debug, Clone)]
#[command(name = "weir-loadgen", version, about, long_about = None)]
struct Args {
    /// A shipped scenario's name (steady, spike, sawtooth, diurnal, drain, fanout, topic, rpc,
    /// max, max-per-message, max-batch, steady-5k, steady-20k, drain-after-restart, retry) or a path
    /// to a scenario file.
    #[arg(long, default_value = "spike")]
    scenario: String,
    /// List the shipped scenarios and exit.
    #[arg(long)]
    list: bool,
    /// The broker to load (ignored with --spawn-broker).
    #[arg(long, default_value = "127.0.0.1:5680")]
    addr: String,
    /// Start a `weir serve` on a temporary data directory and ephemeral ports for this run, and
    /// stop it (and remove the directory) at the end.
    #[arg(long)]
    spawn_broker: bool,
    /// A tuning profile (tuning/*.toml): the spawned broker's --config (its `cpus` are where the
    /// broker pins its shards), and `[loadgen] cpus` where this tool pins its threads.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// The weir binary for --spawn-broker (default: $WEIR_BIN, then next to this executable,
    /// then target/release/weir, target/debug/weir).
    #[arg(long)]
    weir_bin: Option<PathBuf>,
    /// The spawned broker's fsync policy (always, interval:MS, never), over the profile's.
    #[arg(long)]
    fsync: Option<String>,
    /// Run the scenario against two spawned brokers, A then B, and print them side by side with
    /// B/A ratios. Each side is a profile path, or overrides such as `fsync=never` (several
    /// joined with `+`: `fsync=never+cpus=0`). Example: --compare fsync=always,fsync=never
    #[arg(long, value_name = "A,B")]
    compare: Option<String>,
    /// Producers (rpc: requesters), over the scenario's.
    #[arg(long)]
    producers: Option<u32>,
    /// Consumers (rpc: servers), over the scenario's.
    #[arg(long)]
    consumers: Option<u32>,
    /// Queues, over the scenario's.
    #[arg(long)]
    queues: Option<u32>,
    /// Message body size in bytes (at least 32), over the scenario's.
    #[arg(long)]
    size: Option<u32>,
    /// Most messages per publish frame, over the scenario's.
    #[arg(long)]
    batch: Option<u32>,
    /// Consumer prefetch, over the scenario's.
    #[arg(long)]
    prefetch: Option<u32>,
    /// Each consumer's cap in msgs/s, over the scenario's.
    #[arg(long)]
    consumer_rate: Option<f64>,
    /// Multiply every publish rate and the consumers' cap.
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// Multiply every phase's duration (drain-after-restart: its backlog).
    #[arg(long, default_value_t = 1.0)]
    duration_scale: f64,
    /// Load threads (default: one per `[loadgen] cpus` entry of the profile, else 1).
    #[arg(long)]
    threads: Option<usize>,
    /// Write results.json, .hgrm files, interval logs and pictures here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Queue (and exchange) names start with this (default: lg-SCENARIO-PID).
    #[arg(long)]
    queue_prefix: Option<String>,
    /// Leave the queues on the broker at the end.
    #[arg(long)]
    keep_queues: bool,
    /// No progress line, even on a terminal.
    #[arg(long)]
    no_progress: bool,
    /// SIGKILL the spawned broker at random moments of the publishing phases and restart it on
    /// the same data (implies --spawn-broker); producers and consumers reconnect. Reports lost,
    /// duplicated and resurrected messages and each restart's time (SIGKILL to ready).
    #[arg(long)]
    chaos: bool,
    /// --chaos: how many SIGKILLs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=1000))]
    chaos_kills: u32,
    /// --chaos: the seed of the kill moments and message sizes (default: from the clock; printed).
    #[arg(long)]
    chaos_seed: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let abort = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, abort.clone()) {
            eprintln!("weir-loadgen: cannot handle signal {sig}: {e}");
        }
    }
    match main_inner(&args, abort) {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Usage(e)) => {
            eprintln!("weir-loadgen: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Error(e)) => {
            eprintln!("weir-loadgen: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

enum Failure {
    Usage(String),
    Error(String),
}

fn main_inner(args: &Args, abort: Arc<AtomicBool>) -> Result<u8, Failure> {
    if args.list {
        list_scenarios();
        return Ok(0);
    }
    let found = scenario::find(&args.scenario).map_err(|e| Failure::Usage(e.0))?;
    let name = found.name.clone();
    let mut sc = scenario::parse(&found.label, &found.text).map_err(|e| Failure::Usage(e.0))?;
    apply_flags(&mut sc, args);
    sc.check().map_err(|(key, why)| {
        Failure::Usage(format!(
            "scenario {name} with the flags given: {key}: {why}"
        ))
    })?;
    let profile = match &args.profile {
        Some(p) => Some(Profile::load(p).map_err(Failure::Error)?),
        None => None,
    };
    let (thread_cpus, mut pin_notes) = plan_threads(args, profile.as_ref());
    let machine = machine();
    let progress = !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let prefix = args
        .queue_prefix
        .clone()
        .unwrap_or_else(|| format!("lg-{name}-{}", std::process::id()));
    let config = RunConfig {
        name: name.clone(),
        scenario: sc.clone(),
        addr: args.addr.clone(),
        thread_cpus,
        prefix,
        keep_queues: args.keep_queues,
        progress,
    };

    if sc.kind == scenario::Kind::DrainAfterRestart {
        if args.chaos || args.compare.is_some() {
            return Err(Failure::Usage(format!(
                "scenario {name}: kind = \"drain-after-restart\" restarts the broker itself: \
                 run it with --spawn-broker alone (not --chaos, not --compare)"
            )));
        }
        if !args.spawn_broker {
            return Err(Failure::Usage(format!(
                "scenario {name}: kind = \"drain-after-restart\" stops and restarts the broker \
                 it loads, so it runs only with --spawn-broker (it never stops a broker it did \
                 not start)"
            )));
        }
        return restart_run(args, &config, &machine, &mut pin_notes, abort);
    }

    if sc.kind == scenario::Kind::ExactlyOnce {
        if args.chaos || args.compare.is_some() || !args.spawn_broker {
            return Err(Failure::Usage(format!(
                "scenario {name}: kind = \"exactly-once\" kills and restarts the broker \
                 itself: run it with --spawn-broker alone (not --chaos, not --compare)"
            )));
        }
        return exactly_once_run(args, &config, abort);
    }

    if sc.kind == scenario::Kind::Retry {
        if args.chaos || args.compare.is_some() {
            return Err(Failure::Usage(format!(
                "scenario {name}: kind = \"retry\" runs alone (not --chaos, not --compare)"
            )));
        }
        return retry_run(args, &config);
    }

    if sc.kind == scenario::Kind::Priority {
        if args.chaos || args.compare.is_some() {
            return Err(Failure::Usage(format!(
                "scenario {name}: kind = \"priority\" runs alone (not --chaos, not --compare)"
            )));
        }
        return priority_run(args, &config, abort);
    }

    if args.chaos {
        if args.compare.is_some() {
            return Err(Failure::Usage(
                "--chaos and --compare do not go together".into(),
            ));
        }
        chaos::check(&sc).map_err(Failure::Usage)?;
        let extra = fsync_args(args);
        return chaos_run(args, &config, args.profile.as_deref(), &extra, abort);
    }

    if let Some(spec) = &args.compare {
        let sides: Vec<&str> = spec.split(',').map(str::trim).collect();
        if sides.len() != 2 || sides.iter().any(|s| s.is_empty()) {
            return Err(Failure::Usage(format!(
                "--compare {spec}: expected two configurations, A,B (e.g. fsync=always,fsync=never)"
            )));
        }
        let mut results = Vec::new();
        let mut worst = 0;
        for (label, side) in ["A", "B"].iter().zip(&sides) {
            let (side_profile, extra) = side_config(side, args).map_err(Failure::Usage)?;
            let side_profile = side_profile.or(args.profile.clone());
            println!("=== {label}: {side} ===");
            let out = args
                .out
                .as_ref()
                .map(|d| d.join(format!("{label}-{}", file_safe(side))));
            let (res, code) = one_run(
                args,
                &config,
                side_profile.as_deref(),
                &extra,
                out.as_deref(),
                &machine,
                &mut pin_notes.clone(),
                abort.clone(),
            )?;
            worst = worst.max(code);
            results.push((side.to_string(), res));
            if abort.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(EXIT_INCOMPLETE);
            }
        }
        let text = report::compare(&results[0].0, &results[0].1, &results[1].0, &results[1].1);
        println!("=== compare ===");
        print!("{text}");
        if let Some(dir) = &args.out {
            let path = dir.join("compare.txt");
            std::fs::write(&path, &text)
                .map_err(|e| Failure::Error(format!("writing {}: {e}", path.display())))?;
            println!("wrote {}", path.display());
        }
        return Ok(worst);
    }

    let extra = fsync_args(args);
    let (_, code) = one_run(
        args,
        &config,
        args.profile.as_deref(),
        &extra,
        args.out.as_deref(),
        &machine,
        &mut pin_notes,
        abort,
    )?;
    Ok(code)
}

/// One run: start the broker if asked, run, report, write files, stop the broker.
#[allow(clippy::too_many_arguments)]
fn one_run(
    args: &Args,
    config: &RunConfig,
    profile: Option<&Path>,
    extra: &[String],
    out: Option<&Path>,
    machine: &str,
    pin_notes: &mut Vec<String>,
    abort: Arc<AtomicBool>,
) -> Result<(Results, u8), Failure> {
    let mut config = config.clone();
    let mut spawned = None;
    let broker_setup;
    if args.spawn_broker || args.compare.is_some() {
        let bin = find_weir(args.weir_bin.as_deref()).map_err(Failure::Error)?;
        let b = SpawnedBroker::start(&bin, profile, extra).map_err(Failure::Error)?;
        config.addr = b.listen.clone();
        broker_setup = spawned_setup(&bin, &b, profile, extra);
        println!("broker ready: {}", b.ready_line);
        spawned = Some(b);
    } else {
        broker_setup = format!(
            "not started by weir-loadgen (its own configuration){}",
            profile.map_or(String::new(), |p| format!(
                "; profile {} used for the loadgen's pinning only",
                p.display()
            ))
        );
    }
    println!(
        "running {} ({}) against {}",
        config.name, config.scenario.description, config.addr
    );
    let outcome = run::run(&config, abort);
    // Stop the broker before anything else can fail: its data must go whatever happens next.
    if let Some(b) = spawned.take() {
        stop_broker(b, outcome.is_err());
    }
    let outcome = outcome.map_err(Failure::Error)?;
    let mut res = report::results(
        &config.name,
        &config.scenario,
        &outcome,
        &broker_setup,
        machine,
    );
    res.loadgen_pinning.append(pin_notes);
    print!("{}", report::summary(&res));
    if let Some(dir) = out {
        let mut files = report::write_files(dir, &res, &outcome).map_err(Failure::Error)?;
        match plot::draw_all(dir, &res, &outcome) {
            Ok(f) => files.extend(f),
            Err(e) => eprintln!("weir-loadgen: {e}"),
        }
        println!(
            "wrote {} files to {}: {}",
            files.len(),
            dir.display(),
            files.join(", ")
        );
    }
    let c = &res.check;
    let mut code = 0;
    if c.lost > 0 {
        let line = format!(
            "!!! LOSS: {} confirmed message(s) were never delivered (lost {}, delivered {} of {} confirmed) !!!",
            c.lost, c.lost, c.delivered_unique, c.confirmed
        );
        println!("{line}");
        // On stderr too (scripts watch it), unless both go to the same terminal.
        if !(std::io::IsTerminal::is_terminal(&std::io::stdout())
            && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        {
            eprintln!("{line}");
        }
        code = EXIT_LOSS;
    } else if !res.backlog.drained || res.aborted || res.publish_failures > 0 {
        let why = if res.aborted {
            "stopped by a signal"
        } else if !res.backlog.drained {
            "the queues did not drain"
        } else {
            "some publishes failed"
        };
        println!("incomplete run: {why}");
        code = EXIT_INCOMPLETE;
    }
    Ok((res, code))
}

/// How a spawned broker was started and pinned, for the report.
fn spawned_setup(
    bin: &broker::WeirBin,
    b: &SpawnedBroker,
    profile: Option<&Path>,
    extra: &[String],
) -> String {
    let cpus = profile
        .and_then(|p| Profile::load(p).ok())
        .map(|p| p.broker_cpus)
        .unwrap_or_else(|| "all (no profile)".into());
    format!(
        "spawned {} ({}, pid {}), {}; shards pinned by the broker to cpus {}{}; \
         data in {} (removed at the end)",
        bin.path.display(),
        bin.how,
        b.pid().unwrap_or(0),
        profile.map_or("no profile".to_string(), |p| format!(
            "profile {}",
            p.display()
        )),
        cpus,
        if extra.is_empty() {
            String::new()
        } else {
            format!("; flags {}", extra.join(" "))
        },
        b.data_dir().map_or("?".into(), |d| d.display().to_string())
    )
}

/// `kind = "exactly-once"`: idempotent producers against the spawned broker, SIGKILLed and
/// restarted while they publish (`exactly_once`); exit 3 if a message was lost or duplicated.
fn exactly_once_run(
    args: &Args,
    config: &RunConfig,
    abort: Arc<AtomicBool>,
) -> Result<u8, Failure> {
    let extra = fsync_args(args);
    let profile = args.profile.as_deref();
    let bin = find_weir(args.weir_bin.as_deref()).map_err(Failure::Error)?;
    let mut broker = SpawnedBroker::start(&bin, profile, &extra).map_err(Failure::Error)?;
    println!("broker ready: {}", broker.ready_line);
    let kills = config.scenario.kills();
    let outcome = exactly_once::run(config, &mut broker, kills, abort);
    let (status, stderr) = broker.stop();
    if outcome.is_err() {
        println!("broker {status}");
        if !stderr.trim().is_empty() {
            println!("broker stderr (tail):\n{}", stderr.trim_end());
        }
    }
    let report = outcome.map_err(Failure::Error)?;
    let text = report.summary();
    print!("{text}");
    write_results(args.out.as_deref(), &report, text)?;
    Ok(
        if report.lost > 0 || report.duplicated > 0 || report.failed > 0 {
            println!(
                "!!! exactly-once broken: lost {}, duplicates {}, failed {} !!!",
                report.lost, report.duplicated, report.failed
            );
            3
        } else {
            0
        },
    )
}

/// `kind = "retry"`: against the spawned broker or `--addr`; the report and `results.json` say
/// how late the retries came against their schedule and how many ended dead-lettered.
fn retry_run(args: &Args, config: &RunConfig) -> Result<u8, Failure> {
    let abort = Arc::new(AtomicBool::new(false));
    let report = alone(args, config, |config, setup| {
        retry::run(config, setup, abort)
    })?;
    let text = report.summary();
    print!("{text}");
    write_results(args.out.as_deref(), &report, text)?;
    Ok(
        if report.early > 0 || report.dead_lettered != report.dead_letters_expected {
            println!(
                "!!! retry faults: {} early redeliveries, {} dead-lettered of {} expected !!!",
                report.early, report.dead_lettered, report.dead_letters_expected
            );
            EXIT_LOSS
        } else if !report.complete {
            EXIT_INCOMPLETE
        } else {
            0
        },
    )
}

/// `kind = "drain-after-restart"`: the spawned broker, stopped and started again between a
/// fill and its drain (`restart`); the report and `results.json` say how fast each drain went
/// against a raw O_DIRECT read of the journal.
fn restart_run(
    args: &Args,
    config: &RunConfig,
    machine: &str,
    pin_notes: &mut Vec<String>,
    abort: Arc<AtomicBool>,
) -> Result<u8, Failure> {
    let extra = fsync_args(args);
    let profile = args.profile.as_deref();
    let bin = find_weir(args.weir_bin.as_deref()).map_err(Failure::Error)?;
    let mut broker = SpawnedBroker::start(&bin, profile, &extra).map_err(Failure::Error)?;
    let setup = spawned_setup(&bin, &broker, profile, &extra);
    println!("broker ready: {}", broker.ready_line);
    println!(
        "running {} ({}) against {}",
        config.name, config.scenario.description, broker.listen
    );
    let outcome = restart::run(config, &mut broker, &setup, machine, abort);
    let (status, stderr) = broker.stop();
    if outcome.is_err() || !status.starts_with("stopped by SIGTERM (exit status: 0)") {
        println!("broker {status}");
        if !stderr.trim().is_empty() {
            println!("broker stderr (tail):\n{}", stderr.trim_end());
        }
    }
    let mut report = outcome.map_err(Failure::Error)?;
    report.loadgen_pinning.append(pin_notes);
    let text = report.summary();
    print!("{text}");
    write_results(args.out.as_deref(), &report, text)?;
    let c = &report.check;
    Ok(if c.lost > 0 {
        let line = format!(
            "!!! LOSS: {} confirmed message(s) were never delivered (lost {}, delivered {} of {} confirmed) !!!",
            c.lost, c.lost, c.delivered_unique, c.confirmed
        );
        println!("{line}");
        eprintln!("{line}");
        EXIT_LOSS
    } else if !report.drained || report.aborted || report.publish_failures > 0 || c.duplicated > 0 {
        let why = if report.aborted {
            "stopped by a signal"
        } else if !report.drained {
            "a drain did not finish"
        } else if c.duplicated > 0 {
            "messages were delivered twice"
        } else {
            "some publishes failed"
        };
        println!("incomplete run: {why}");
        EXIT_INCOMPLETE
    } else {
        0
    })
}

/// `--chaos`: a spawned broker, killed and restarted during the run; the report and
/// `chaos.json` say whether the durability promise held.
fn chaos_run(
    args: &Args,
    config: &RunConfig,
    profile: Option<&Path>,
    extra: &[String],
    abort: Arc<AtomicBool>,
) -> Result<u8, Failure> {
    let seed = args.chaos_seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let bin = find_weir(args.weir_bin.as_deref()).map_err(Failure::Error)?;
    let mut broker = SpawnedBroker::start(&bin, profile, extra).map_err(Failure::Error)?;
    println!("broker ready: {}", broker.ready_line);
    println!(
        "running {} ({}) with {} SIGKILLs, --chaos-seed {seed}",
        config.name, config.scenario.description, args.chaos_kills
    );
    let chaos = chaos::Chaos {
        kills: args.chaos_kills,
        seed,
    };
    let outcome = chaos::run(config, chaos, &mut broker, abort);
    let (status, stderr) = broker.stop();
    if outcome.is_err() || !status.starts_with("stopped by SIGTERM (exit status: 0)") {
        println!("broker {status}");
        if !stderr.trim().is_empty() {
            println!("broker stderr (tail):\n{}", stderr.trim_end());
        }
    }
    let report = outcome.map_err(Failure::Error)?;
    print!("{}", report.summary());
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| Failure::Error(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("chaos.json");
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| Failure::Error(format!("encoding chaos.json: {e}")))?;
        std::fs::write(&path, json + "\n")
            .map_err(|e| Failure::Error(format!("writing {}: {e}", path.display())))?;
        println!("wrote {}", path.display());
    }
    Ok(if !report.promise_kept() {
        let line = format!(
            "!!! LOSS: {} confirmed message(s) lost, {} resurrected, {} never published !!!",
            report.lost, report.resurrected, report.never_published
        );
        println!("{line}");
        eprintln!("{line}");
        EXIT_LOSS
    } else if !report.drained || report.aborted || report.other_failures > 0 {
        EXIT_INCOMPLETE
    } else {
        0
    })
}

fn apply_flags(sc: &mut scenario::Scenario, args: &Args) {
    if let Some(v) = args.producers {
        sc.producers = v;
    }
    if let Some(v) = args.consumers {
        sc.consumers = v;
    }
    if let Some(v) = args.queues {
        sc.queues = v;
    }
    if let Some(v) = args.size {
        sc.size = scenario::Size::Fixed(v);
    }
    if let Some(v) = args.batch {
        sc.batch = v;
    }
    if let Some(v) = args.prefetch {
        sc.prefetch = v;
        sc.ack_batch = sc.ack_batch.min(v.max(1));
    }
    if args.rate_scale != 1.0 {
        sc.scale_rates(args.rate_scale);
    }
    if let Some(v) = args.consumer_rate {
        sc.consumer_rate = Some(v);
    }
    if args.duration_scale != 1.0 {
        sc.scale_durations(args.duration_scale);
    }
}

/// A compare side: a profile path, or `key=value` overrides joined with `+`.
fn side_config(side: &str, args: &Args) -> Result<(Option<PathBuf>, Vec<String>), String> {
    if !side.contains('=') {
        let p = PathBuf::from(side);
        if !p.is_file() {
            return Err(format!(
                "--compare: '{side}' is neither a profile file nor key=value overrides"
            ));
        }
        return Ok((Some(p), Vec::new()));
    }
    let mut extra = Vec::new();
    if let Some(f) = &args.fsync {
        extra.extend(["--fsync".to_string(), f.clone()]);
    }
    for kv in side.split('+') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--compare: '{kv}': expected key=value"))?;
        let flag = match k.trim() {
            "fsync" => "--fsync",
            "cpus" => "--cpus",
            other => {
                return Err(format!(
                    "--compare: '{other}': only fsync and cpus can be overridden (or give a profile path)"
                ))
            }
        };
        extra.extend([flag.to_string(), v.trim().to_string()]);
    }
    Ok((None, extra))
}

fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What this tool reads from a tuning profile.
struct Profile {
    /// `[loadgen] cpus`.
    loadgen_cpus: Option<Vec<usize>>,
    /// The broker's top-level `cpus`, as text.
    broker_cpus: String,
}

impl Profile {
    fn load(path: &Path) -> Result<Profile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("profile {}: {e}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| format!("profile {}: {e}", path.display()))?;
        let loadgen_cpus = match table.get("loadgen").and_then(|l| l.get("cpus")) {
            None => None,
            Some(toml::Value::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        v.as_integer()
                            .and_then(|i| usize::try_from(i).ok())
                            .ok_or_else(|| {
                                format!(
                                    "profile {}: loadgen.cpus: expected CPU numbers, got {v}",
                                    path.display()
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(other) => {
                return Err(format!(
                    "profile {}: loadgen.cpus: expected a list of CPU numbers, got {other}",
                    path.display()
                ))
            }
        };
        let broker_cpus = match table.get("cpus") {
            Some(toml::Value::Array(a)) => format!(
                "[{}]",
                a.iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(v) => v.to_string().trim_matches('"').to_string(),
            None => "all (the profile sets none)".to_string(),
        };
        Ok(Profile {
            loadgen_cpus,
            broker_cpus,
        })
    }
}

/// One entry per load thread (its CPU, if it is pinned), and notes on pinning not done.
fn plan_threads(args: &Args, profile: Option<&Profile>) -> (Vec<Option<usize>>, Vec<String>) {
    let mut notes = Vec::new();
    let cpus = profile
        .and_then(|p| p.loadgen_cpus.clone())
        .unwrap_or_default();
    let threads = args.threads.unwrap_or(cpus.len()).max(1);
    if cpus.is_empty() {
        notes.push(match profile {
            Some(_) => "no pinning: the profile has no [loadgen] cpus".to_string(),
            None => "no pinning: no --profile".to_string(),
        });
        return (vec![None; threads], notes);
    }
    let allowed: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let plan = (0..threads)
        .map(|i| {
            let cpu = cpus[i % cpus.len()];
            if allowed.contains(&cpu) {
                Some(cpu)
            } else {
                notes.push(format!(
                    "thread {i}: no pinning: cpu {cpu} is not one this process may use ({allowed:?})"
                ));
                None
            }
        })
        .collect();
    (plan, notes)
}

/// "CPU model, N CPUs, M GiB, Linux x.y": what every number depends on.
fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(String::new(), |kb| {
            format!(", {:.0} GiB", kb / 1024.0 / 1024.0)
        });
    let kernel = read("/proc/sys/kernel/osrelease");
    format!("{model}, {cpus} CPUs{mem_gib}, Linux {}", kernel.trim())
}

fn list_scenarios() {
    for (name, _) in scenario::SHIPPED {
        match scenario::find(name).and_then(|f| scenario::parse(&f.label, &f.text)) {
            Ok(s) => println!("{name:<10} {}", s.description),
            Err(e) => println!("{name:<10} (refused: {e})"),
        }
    }
}

/// `kind = "priority"`: against the broker given, or one spawned for the run.
fn priority_run(args: &Args, config: &RunConfig, abort: Arc<AtomicBool>) -> Result<u8, Failure> {
    let report = alone(args, config, |config, setup| {
        priority::run(config, setup, abort)
    })?;
    let text = report.summary();
    print!("{text}");
    write_results(args.out.as_deref(), &report, text)?;
    Ok(if report.drained && !report.aborted {
        0
    } else {
        EXIT_INCOMPLETE
    })
}

/// `--fsync` as arguments for a spawned broker.
fn fsync_args(args: &Args) -> Vec<String> {
    args.fsync
        .iter()
        .flat_map(|f| ["--fsync".to_string(), f.clone()])
        .collect()
}

/// Stops a spawned broker (its data goes with it), telling its exit and the tail of its stderr
/// when the run `failed` or it did not stop cleanly.
fn stop_broker(b: SpawnedBroker, failed: bool) {
    let (status, stderr) = b.stop();
    if failed || !status.starts_with("stopped by SIGTERM (exit status: 0)") {
        println!("broker {status}");
        if !stderr.trim().is_empty() {
            println!("broker stderr (tail):\n{}", stderr.trim_end());
        }
    }
}

/// Writes a run's `results.json` (`report`) and `summary.txt` (`text`) into `out`, if given.
fn write_results<R: serde::Serialize>(
    out: Option<&Path>,
    report: &R,
    text: String,
) -> Result<(), Failure> {
    let Some(dir) = out else {
        return Ok(());
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::Error(format!("creating {}: {e}", dir.display())))?;
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| Failure::Error(format!("encoding results.json: {e}")))?;
    for (name, bytes) in [("results.json", json + "\n"), ("summary.txt", text)] {
        let path = dir.join(name);
        std::fs::write(&path, bytes)
            .map_err(|e| Failure::Error(format!("writing {}: {e}", path.display())))?;
    }
    println!("wrote results.json, summary.txt to {}", dir.display());
    Ok(())
}

/// A scenario kind that runs alone (`retry`, `priority`): against the broker it spawns (stopped
/// once `run` returns, whatever it returned) or `--addr`; `run` gets the configuration with the
/// broker's address and a line saying how the broker was set up.
fn alone<R>(
    args: &Args,
    config: &RunConfig,
    run: impl FnOnce(&RunConfig, &str) -> Result<R, String>,
) -> Result<R, Failure> {
    let mut config = config.clone();
    let mut spawned = None;
    let setup = if args.spawn_broker {
        let extra = fsync_args(args);
        let profile = args.profile.as_deref();
        let bin = find_weir(args.weir_bin.as_deref()).map_err(Failure::Error)?;
        let b = SpawnedBroker::start(&bin, profile, &extra).map_err(Failure::Error)?;
        config.addr = b.listen.clone();
        let setup = spawned_setup(&bin, &b, profile, &extra);
        println!("broker ready: {}", b.ready_line);
        spawned = Some(b);
        setup
    } else {
        "not started by weir-loadgen (its own configuration)".to_string()
    };
    println!(
        "running {} ({}) against {}",
        config.name, config.scenario.description, config.addr
    );
    let outcome = run(&config, &setup);
    if let Some(b) = spawned.take() {
        stop_broker(b, outcome.is_err());
    }
    outcome.map_err(Failure::Error)
}
