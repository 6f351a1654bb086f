//! Configuration of `weir serve`: defaults that just work, a TOML file, `WEIR_*` environment
//! variables and command-line flags, in that order of precedence.
//!
//! Contract: runs once, on the main thread, before any shard starts. It owns nothing after
//! start-up: the result is a plain `Config` the shards copy what they need from. Faults handled:
//! every bad value (unknown key, wrong type, out of range, a CPU the process may not use, limits
//! that disagree) is a `ConfigError` naming the key and the reason; the broker prints it and
//! exits non-zero instead of starting with a guess.
//!
//! Tuning profiles under `tuning/` are configuration files of this same format; their optional
//! `[loadgen]` table is for weir-loadgen and ignored here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::limits::Limits;

/// What a confirm promises; `Always` is the default and the policy headline numbers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Confirm after fdatasync returned (group commit shares one fdatasync among many publishes).
    Always,
    /// Confirm once the message is staged for the next group commit, before it is written.
    /// The journal still fdatasyncs every group commit (about a millisecond here), so
    /// `fsync_interval_ms` is validated and reported but has no effect yet: there is no
    /// interval timer until the journal learns to skip fdatasyncs.
    Interval,
    /// As `Interval`, with no bound promised: a crash may lose confirmed messages of the commit
    /// in flight. (The journal does not skip fdatasync yet; only the confirm stops waiting.)
    Never,
}

impl FsyncPolicy {
    /// The name used in configuration files and flags.
    pub fn name(self) -> &'static str {
        match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::Interval => "interval",
            FsyncPolicy::Never => "never",
        }
    }
}

/// How `weir serve` writes its log lines (to stderr).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One line of text per event, its spans (`shard{shard=0}:connection{connection=..}`) first.
    Text,
    /// One JSON object per line, with its spans and their fields, for journald or a collector.
    Json,
}

/// Which CPUs run shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cpus {
    /// One shard per CPU this process may use (its affinity mask or cgroup cpuset).
    All,
    /// These CPUs, one shard each, in this order (shard i on the i-th).
    List(Vec<usize>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Address every shard accepts on (SO_REUSEPORT spreads connections across shards).
    pub listen: SocketAddr,
    /// Shard i also listens on `shard_port_base + i`, for shard-aware clients; 0 picks free ports.
    pub shard_port_base: u16,
    pub data_dir: PathBuf,
    pub cpus: Cpus,
    pub fsync: FsyncPolicy,
    /// Longest a written commit may wait for its fdatasync under `fsync = interval`, ms. No
    /// effect yet: every group commit is fdatasynced at once (see `FsyncPolicy::Interval`).
    pub fsync_interval_ms: u64,
    /// Spin this long before parking an idle shard: lower wake-up latency for a burned core.
    pub spin_before_park_us: u64,
    /// glommio's pool of DMA buffers per shard, bytes.
    pub io_memory_bytes: usize,
    pub limits: Limits,
    /// How log lines are written: text (default) or JSON.
    pub log_format: LogFormat,
    /// The admin HTTP listener (`/metrics`, `/api/`, `/health`, `/ready`, the dashboard); `None`:
    /// off (`--no-admin`, or `admin_listen = "off"`).
    pub admin_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5680)),
            shard_port_base: 5681,
            data_dir: PathBuf::from("./weir-data"),
            cpus: Cpus::All,
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 10,
            spin_before_park_us: 0,
            io_memory_bytes: 8 << 20,
            limits: Limits::DEFAULT,
            log_format: LogFormat::Text,
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 15680))),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The key as the user wrote it: `limits.prefetch_max`, `WEIR_FSYNC`, `--cpus`, ...
    pub key: String,
    pub reason: String,
    /// The configuration file the bad value came from; `None` for flags, variables and keys
    /// that no file set.
    pub file: Option<PathBuf>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}: {}: {}", file.display(), self.key, self.reason),
            None => write!(f, "{}: {}", self.key, self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
            file: None,
        }
    }

    fn in_file(mut self, path: &Path) -> ConfigError {
        self.file = Some(path.to_path_buf());
        self
    }
}

/// A TOML error as one line naming the key the user wrote (`limits.prefetch_max`, found from
/// the error's position: the key on its line, under the table header above it) and the line;
/// toml's own message carries serde's words, with the internal type names replaced.
fn toml_error(text: &str, path: &Path, e: &toml::de::Error) -> ConfigError {
    let start = e.span().map_or(0, |s| s.start).min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let lines: Vec<&str> = text.lines().collect();
    let line = lines.get(line_no - 1).copied().unwrap_or("").trim();
    let header = |l: &str| {
        let l = l.trim();
        (l.starts_with('[') && l.ends_with(']'))
            .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    };
    let key = match header(line) {
        Some(table) => Some(table),
        None => line.split_once('=').map(|(k, _)| {
            let k = k.trim().trim_matches('"').to_string();
            let table = lines[..(line_no - 1).min(lines.len())]
                .iter()
                .rev()
                .find_map(|l| header(l));
            match table {
                Some(t) => format!("{t}.{k}"),
                None => k,
            }
        }),
    };
    let message = e.message().trim_end().replace('\n', "; ");
    ConfigError::new(
        key.unwrap_or_else(|| format!("line {line_no}")),
        format!("{message} (line {line_no})"),
    )
    .in_file(path)
}

/// The file format: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    shard_port_base: Option<u16>,
    data_dir: Option<PathBuf>,
    cpus: Option<CpusValue>,
    /// "always", "never", "interval" (with `fsync_interval_ms`) or "interval:MS".
    fsync: Option<String>,
    fsync_interval_ms: Option<u64>,
    spin_before_park_us: Option<u64>,
    io_memory_bytes: Option<usize>,
    limits: Option<FileLimits>,
    /// weir-loadgen's part of a tuning profile; not the broker's business.
    #[allow(dead_code)]
    loadgen: Option<toml::Table>,
    /// "text" or "json".
    log_format: Option<String>,
    /// An address, or "off".
    admin_listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "expected \"all\" or a list of CPU numbers like [0, 1]"
)]
enum CpusValue {
    Word(String),
    List(Vec<usize>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table of limits: [limits] with keys like prefetch_max = 1000"
)]
struct FileLimits {
    frame_size_max: Option<u32>,
    message_size_max: Option<u32>,
    publish_batch_max: Option<u32>,
    deliver_batch_max: Option<u32>,
    headers_max: Option<u32>,
    segment_size_bytes_max: Option<u64>,
    commit_bytes_max: Option<u32>,
    staged_bytes_max: Option<u64>,
    connections_per_shard_max: Option<u32>,
    publishes_in_flight_max: Option<u32>,
    prefetch_default: Option<u32>,
    prefetch_max: Option<u32>,
    targets_per_message_max: Option<u32>,
    exchanges_max: Option<u32>,
    bindings_max: Option<u32>,
    delay_ms_max: Option<u64>,
    handshake_timeout_ms: Option<u64>,
    cache_bytes_max: Option<u64>,
    outbox_bytes_max: Option<u64>,
    consumer_timeout_ms: Option<u64>,
    queued_messages_max: Option<u64>,
    requests_in_flight_max: Option<u32>,
    consumers_per_connection_max: Option<u32>,
    queues_per_shard_max: Option<u32>,
    gets_unacked_max: Option<u32>,
    publish_bytes_in_flight_max: Option<u64>,
    work_bytes_max: Option<u64>,
    mesh_outgoing_bytes_max: Option<u64>,
    message_copy_bytes_max: Option<u32>,
    reserve_bytes: Option<u64>,
    read_ahead_bytes_max: Option<u64>,
    producer_window_max: Option<u64>,
    producers_per_shard_max: Option<u32>,
    producer_idle_expiry_ms: Option<u64>,
    retry_delays_count_max: Option<u32>,
    admin_connections_max: Option<u32>,
    admin_body_bytes_max: Option<u64>,
    admin_request_timeout_ms: Option<u64>,
    admin_metrics_queues_max: Option<u32>,
    admin_requests_per_second_max: Option<u32>,
}

/// Overrides from the command line (`None`: not given).
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub listen: Option<String>,
    pub shard_port_base: Option<u16>,
    pub data_dir: Option<PathBuf>,
    pub cpus: Option<String>,
    pub fsync: Option<String>,
    pub log_format: Option<String>,
    pub admin_listen: Option<String>,
    /// `--no-admin`: no admin listener, whatever else says.
    pub no_admin: bool,
}

impl Config {
    /// Defaults, then the file (`--config` or `WEIR_CONFIG`), then `WEIR_*` variables from `env`,
    /// then flags; then every value and limit is checked.
    pub fn load(
        flags: &Flags,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        // Keys a variable or flag set after the file: a later error about them is not the file's.
        // (key, the variable or flag that set it), the last one the one in force.
        let mut overridden: Vec<(&str, &str)> = Vec::new();
        let path = flags
            .config
            .clone()
            .or_else(|| env("WEIR_CONFIG").map(PathBuf::from));
        if let Some(path) = &path {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
            })?;
            config
                .apply_file(&text, path)
                .map_err(|e| e.in_file(path))?;
        }
        let vars = [
            ("WEIR_LISTEN", "listen"),
            ("WEIR_SHARD_PORT_BASE", "shard_port_base"),
            ("WEIR_DATA_DIR", "data_dir"),
            ("WEIR_CPUS", "cpus"),
            ("WEIR_FSYNC", "fsync"),
            ("WEIR_LOG_FORMAT", "log_format"),
            ("WEIR_ADMIN_LISTEN", "admin_listen"),
        ];
        for (var, key) in vars {
            if let Some(value) = env(var) {
                config
                    .set(key, &value)
                    .map_err(|reason| ConfigError::new(var, reason))?;
                overridden.push((key, var));
            }
        }
        let given = [
            ("--listen", "listen", flags.listen.clone()),
            (
                "--shard-port-base",
                "shard_port_base",
                flags.shard_port_base.map(|p| p.to_string()),
            ),
            (
                "--data-dir",
                "data_dir",
                flags.data_dir.as_ref().map(|p| p.display().to_string()),
            ),
            ("--cpus", "cpus", flags.cpus.clone()),
            ("--fsync", "fsync", flags.fsync.clone()),
            ("--log-format", "log_format", flags.log_format.clone()),
            ("--admin-listen", "admin_listen", flags.admin_listen.clone()),
        ];
        for (flag, key, value) in given {
            if let Some(value) = value {
                config
                    .set(key, &value)
                    .map_err(|reason| ConfigError::new(flag, reason))?;
                overridden.push((key, flag));
            }
        }
        if let Some(&(_, source)) = overridden.iter().rev().find(|(k, _)| *k == "fsync") {
            overridden.push(("fsync_interval_ms", source));
        }
        if flags.no_admin {
            config.admin_listen = None;
        }
        config.check().map_err(|mut e| {
            match overridden.iter().rev().find(|(k, _)| *k == e.key) {
                // Named as the user set it: `WEIR_CPUS`, `--fsync`.
                Some(&(_, source)) => {
                    e.key = source.to_string();
                    e
                }
                None => match &path {
                    Some(path) => e.in_file(path),
                    None => e,
                },
            }
        })?;
        Ok(config)
    }

    fn apply_file(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| toml_error(text, path, &e))?;
        if let Some(v) = file.listen {
            self.set("listen", &v)
                .map_err(|r| ConfigError::new("listen", r))?;
        }
        if let Some(v) = file.shard_port_base {
            self.shard_port_base = v;
        }
        if let Some(v) = file.data_dir {
            self.data_dir = v;
        }
        match file.cpus {
            Some(CpusValue::Word(w)) => self
                .set("cpus", &w)
                .map_err(|r| ConfigError::new("cpus", r))?,
            Some(CpusValue::List(list)) => self.cpus = Cpus::List(list),
            None => {}
        }
        if let Some(v) = file.fsync_interval_ms {
            self.fsync_interval_ms = v;
        }
        if let Some(v) = file.fsync {
            self.set("fsync", &v)
                .map_err(|r| ConfigError::new("fsync", r))?;
        }
        if let Some(v) = file.spin_before_park_us {
            self.spin_before_park_us = v;
        }
        if let Some(v) = file.io_memory_bytes {
            self.io_memory_bytes = v;
        }
        if let Some(v) = file.log_format {
            self.set("log_format", &v)
                .map_err(|r| ConfigError::new("log_format", r))?;
        }
        if let Some(v) = file.admin_listen {
            self.set("admin_listen", &v)
                .map_err(|r| ConfigError::new("admin_listen", r))?;
        }
        if let Some(l) = file.limits {
            let (w, s, b) = (
                &mut self.limits.wire,
                &mut self.limits.storage,
                &mut self.limits.broker,
            );
            let set = |slot: &mut u32, v: Option<u32>| *slot = v.unwrap_or(*slot);
            set(&mut w.frame_size_max, l.frame_size_max);
            set(&mut w.message_size_max, l.message_size_max);
            set(&mut w.publish_batch_max, l.publish_batch_max);
            set(&mut w.deliver_batch_max, l.deliver_batch_max);
            set(&mut w.headers_max, l.headers_max);
            set(&mut s.commit_bytes_max, l.commit_bytes_max);
            set(
                &mut b.connections_per_shard_max,
                l.connections_per_shard_max,
            );
            set(&mut b.publishes_in_flight_max, l.publishes_in_flight_max);
            set(&mut b.prefetch_default, l.prefetch_default);
            set(&mut b.prefetch_max, l.prefetch_max);
            set(&mut b.targets_per_message_max, l.targets_per_message_max);
            set(&mut b.exchanges_max, l.exchanges_max);
            set(&mut b.bindings_max, l.bindings_max);
            s.segment_size_bytes_max = l.segment_size_bytes_max.unwrap_or(s.segment_size_bytes_max);
            s.staged_bytes_max = l.staged_bytes_max.unwrap_or(s.staged_bytes_max);
            b.cache_bytes_max = l.cache_bytes_max.unwrap_or(b.cache_bytes_max);
            b.delay_ms_max = l.delay_ms_max.unwrap_or(b.delay_ms_max);
            b.handshake_timeout_ms = l.handshake_timeout_ms.unwrap_or(b.handshake_timeout_ms);
            b.outbox_bytes_max = l.outbox_bytes_max.unwrap_or(b.outbox_bytes_max);
            b.consumer_timeout_ms = l.consumer_timeout_ms.unwrap_or(b.consumer_timeout_ms);
            b.queued_messages_max = l.queued_messages_max.unwrap_or(b.queued_messages_max);
            set(&mut b.requests_in_flight_max, l.requests_in_flight_max);
            set(
                &mut b.consumers_per_connection_max,
                l.consumers_per_connection_max,
            );
            set(&mut b.queues_per_shard_max, l.queues_per_shard_max);
            set(&mut b.gets_unacked_max, l.gets_unacked_max);
            b.publish_bytes_in_flight_max = l
                .publish_bytes_in_flight_max
                .unwrap_or(b.publish_bytes_in_flight_max);
            b.work_bytes_max = l.work_bytes_max.unwrap_or(b.work_bytes_max);
            b.mesh_outgoing_bytes_max = l
                .mesh_outgoing_bytes_max
                .unwrap_or(b.mesh_outgoing_bytes_max);
            set(&mut b.message_copy_bytes_max, l.message_copy_bytes_max);
            b.read_ahead_bytes_max = l.read_ahead_bytes_max.unwrap_or(b.read_ahead_bytes_max);
            b.producer_window_max = l.producer_window_max.unwrap_or(b.producer_window_max);
            set(&mut b.producers_per_shard_max, l.producers_per_shard_max);
            b.producer_idle_expiry_ms = l
                .producer_idle_expiry_ms
                .unwrap_or(b.producer_idle_expiry_ms);
            set(&mut b.retry_delays_count_max, l.retry_delays_count_max);
            let a = &mut self.limits.admin;
            set(&mut a.admin_connections_max, l.admin_connections_max);
            set(&mut a.admin_metrics_queues_max, l.admin_metrics_queues_max);
            set(
                &mut a.admin_requests_per_second_max,
                l.admin_requests_per_second_max,
            );
            a.admin_body_bytes_max = l.admin_body_bytes_max.unwrap_or(a.admin_body_bytes_max);
            a.admin_request_timeout_ms = l
                .admin_request_timeout_ms
                .unwrap_or(a.admin_request_timeout_ms);
            // Two segments unless set: the reserve is counted in segments, whatever their size.
            s.reserve_bytes = l.reserve_bytes.unwrap_or(2 * s.segment_size_bytes_max);
            // The verifier's table budget follows the batch sizes it must cover.
            w.verifier_tables_max = 4 * w.publish_batch_max.max(w.deliver_batch_max) as usize + 64;
        }
        Ok(())
    }

    /// Sets one top-level key from its text form (environment variables and flags).
    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "listen" => {
                self.listen = value
                    .parse()
                    .map_err(|_| format!("'{value}' is not an address like 127.0.0.1:5680"))?
            }
            "shard_port_base" => {
                self.shard_port_base = value
                    .parse()
                    .map_err(|_| format!("'{value}' is not a port (0-65535)"))?
            }
            "data_dir" => self.data_dir = PathBuf::from(value),
            "cpus" => {
                self.cpus = if value == "all" {
                    Cpus::All
                } else {
                    Cpus::List(
                        value
                            .split(',')
                            .map(|c| c.trim().parse::<usize>())
                            .collect::<Result<_, _>>()
                            .map_err(|_| format!("'{value}' is neither \"all\" nor a list of CPU numbers like 0,1"))?,
                    )
                }
            }
            "fsync" => {
                self.fsync = match value.split_once(':') {
                    None if value == "always" => FsyncPolicy::Always,
                    None if value == "interval" => FsyncPolicy::Interval,
                    None if value == "never" => FsyncPolicy::Never,
                    Some(("interval", ms)) => {
                        self.fsync_interval_ms = ms.parse().map_err(|_| {
                            format!("'{value}': the interval must be a number of milliseconds")
                        })?;
                        FsyncPolicy::Interval
                    }
                    _ => {
                        return Err(format!(
                            "'{value}' is not one of always, interval:MS, never"
                        ))
                    }
                }
            }
            "log_format" => {
                self.log_format = match value {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err(format!("'{value}' is not one of text, json")),
                }
            }
            "admin_listen" => {
                self.admin_listen = match value {
                    "off" => None,
                    _ => Some(value.parse().map_err(|_| {
                        format!("'{value}' is neither \"off\" nor an address like 127.0.0.1:15680")
                    })?),
                }
            }
            _ => unreachable!("no such key {key}"),
        }
        Ok(())
    }

    /// Checks what can be checked without the machine: ranges and the limits' relations.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Cpus::List(list) = &self.cpus {
            if list.is_empty() {
                return Err(ConfigError::new(
                    "cpus",
                    "the list is empty; give at least one CPU or \"all\"",
                ));
            }
            let mut seen = list.clone();
            seen.sort_unstable();
            if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
                return Err(ConfigError::new(
                    "cpus",
                    format!("CPU {} is listed twice", w[0]),
                ));
            }
        }
        if self.fsync == FsyncPolicy::Interval && self.fsync_interval_ms == 0 {
            return Err(ConfigError::new(
                "fsync_interval_ms",
                "must be at least 1 with fsync = \"interval\"",
            ));
        }
        if self.io_memory_bytes < 512 * 1024 {
            return Err(ConfigError::new(
                "io_memory_bytes",
                "glommio needs at least 512 KiB",
            ));
        }
        self.limits
            .check()
            .map_err(|e| ConfigError::new(e.key, e.reason))
    }

    /// The CPUs to run shards on, checked against those this process may use (`allowed`, from
    /// `sched_getaffinity`: a cgroup cpuset or `taskset` narrows it).
    pub fn shard_cpus(&self, allowed: &[usize]) -> Result<Vec<usize>, ConfigError> {
        let cpus = match &self.cpus {
            Cpus::All => allowed.to_vec(),
            Cpus::List(list) => list.clone(),
        };
        if let Some(bad) = cpus.iter().find(|c| !allowed.contains(c)) {
            return Err(ConfigError::new(
                "cpus",
                format!("CPU {bad} is not one this process may use (allowed: {allowed:?})"),
            ));
        }
        if cpus.is_empty() {
            return Err(ConfigError::new("cpus", "this process may use no CPU"));
        }
        let last_port = u32::from(self.shard_port_base) + cpus.len() as u32 - 1;
        if self.shard_port_base != 0 && last_port > u32::from(u16::MAX) {
            return Err(ConfigError::new(
                "shard_port_base",
                format!(
                    "{} + {} shards runs past port 65535",
                    self.shard_port_base,
                    cpus.len()
                ),
            ));
        }
        Ok(cpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load_file(text: &str) -> Result<Config, ConfigError> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("weir-config-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let flags = Flags {
            config: Some(path.clone()),
            ..Default::default()
        };
        let result = Config::load(&flags, no_env);
        std::fs::remove_file(path).ok();
        result
    }

    #[test]
    fn no_configuration_at_all_gives_the_defaults() {
        let c = Config::load(&Flags::default(), no_env).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listen.to_string(), "127.0.0.1:5680");
        assert_eq!(c.fsync, FsyncPolicy::Always);
    }

    #[test]
    fn file_then_environment_then_flags() {
        let path =
            std::env::temp_dir().join(format!("weir-config-order-{}.toml", std::process::id()));
        std::fs::write(&path, "fsync = \"never\"\ncpus = [1]\nlisten = \"127.0.0.1:7000\"\n[limits]\nprefetch_default = 10\n").unwrap();
        let env = |k: &str| match k {
            "WEIR_FSYNC" => Some("interval".to_string()),
            "WEIR_CPUS" => Some("0,1".to_string()),
            _ => None,
        };
        let flags = Flags {
            config: Some(path.clone()),
            cpus: Some("all".into()),
            ..Default::default()
        };
        let c = Config::load(&flags, env).unwrap();
        std::fs::remove_file(path).ok();
        assert_eq!(c.listen.port(), 7000, "file");
        assert_eq!(c.limits.broker.prefetch_default, 10, "file limits");
        assert_eq!(c.fsync, FsyncPolicy::Interval, "environment over file");
        assert_eq!(c.cpus, Cpus::All, "flag over environment");
    }

    #[test]
    fn bad_values_name_their_key_and_reason() {
        let err = load_file("fsync = \"sometimes\"\n").unwrap_err();
        assert!(
            err.key == "fsync" && err.reason.contains("sometimes"),
            "{err}"
        );
        let c = load_file("fsync = \"interval:25\"\n").unwrap();
        assert_eq!((c.fsync, c.fsync_interval_ms), (FsyncPolicy::Interval, 25));
        let err = load_file("fsync = \"interval:soon\"\n").unwrap_err();
        assert!(err.reason.contains("milliseconds"), "{err}");
        let err = load_file("fsync_typo = 1\n").unwrap_err();
        assert!(err.reason.contains("unknown field `fsync_typo`"), "{err}");
        let err = load_file("[limits]\nprefetch_default = 0\n").unwrap_err();
        assert_eq!(err.key, "limits.prefetch_default", "{err}");
        let err = load_file("[limits]\nhandshake_timeout_ms = 0\n").unwrap_err();
        assert_eq!(err.key, "limits.handshake_timeout_ms", "{err}");
        let c = load_file("[limits]\nhandshake_timeout_ms = 300\n").unwrap();
        assert_eq!(c.limits.broker.handshake_timeout_ms, 300);
        for key in [
            "queued_messages_max",
            "requests_in_flight_max",
            "consumers_per_connection_max",
            "queues_per_shard_max",
            "gets_unacked_max",
        ] {
            let err = load_file(&format!("[limits]\n{key} = 0\n")).unwrap_err();
            assert_eq!(err.key, format!("limits.{key}"), "{err}");
        }
        let c = load_file(
            "[limits]\nqueued_messages_max = 7\nrequests_in_flight_max = 6\n\
             consumers_per_connection_max = 5\nqueues_per_shard_max = 4\ngets_unacked_max = 3\n",
        )
        .unwrap();
        let b = c.limits.broker;
        assert_eq!(
            (
                b.queued_messages_max,
                b.requests_in_flight_max,
                b.consumers_per_connection_max,
                b.queues_per_shard_max,
                b.gets_unacked_max
            ),
            (7, 6, 5, 4, 3)
        );
        let err = load_file("[limits]\nmessage_size_max = 16000000\n").unwrap_err();
        assert_eq!(err.key, "limits.message_size_max", "{err}");
        let err = load_file("cpus = [0, 0]\n").unwrap_err();
        assert_eq!(
            (err.key.as_str(), err.reason.as_str()),
            ("cpus", "CPU 0 is listed twice")
        );
        let err = Config::load(
            &Flags {
                fsync: Some("fast".into()),
                ..Default::default()
            },
            no_env,
        )
        .unwrap_err();
        assert_eq!(err.key, "--fsync");
        let err = Config::load(&Flags::default(), |k| {
            (k == "WEIR_LISTEN").then(|| "localhost".to_string())
        })
        .unwrap_err();
        assert_eq!(err.key, "WEIR_LISTEN");
        assert!(
            err.reason.contains("'localhost' is not an address"),
            "{err}"
        );
    }

    #[test]
    fn cpus_must_be_ones_the_process_may_use() {
        let mut c = Config::default();
        assert_eq!(c.shard_cpus(&[0, 1]).unwrap(), vec![0, 1]);
        c.cpus = Cpus::List(vec![1, 7]);
        let err = c.shard_cpus(&[0, 1]).unwrap_err();
        assert_eq!(err.key, "cpus");
        assert!(
            err.reason.contains("CPU 7 is not one this process may use"),
            "{err}"
        );
    }

    #[test]
    fn the_default_profile_is_exactly_the_built_in_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/default.toml");
        let flags = Flags {
            config: Some(path),
            ..Default::default()
        };
        assert_eq!(Config::load(&flags, no_env).unwrap(), Config::default());
    }

    #[test]
    fn every_tuning_profile_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let flags = Flags {
                    config: Some(path.clone()),
                    ..Default::default()
                };
                Config::load(&flags, no_env).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 3, "expected at least 3 profiles in tuning/, found {n}");
    }

    #[test]
    fn the_disk_reserve_is_two_segments_unless_set_and_at_least_one() {
        let c = load_file("[limits]\nsegment_size_bytes_max = 2097152\n").unwrap();
        assert_eq!(c.limits.storage.reserve_bytes, 2 * 2097152);
        let c = load_file("[limits]\nreserve_bytes = 0\n").unwrap();
        assert_eq!(c.limits.storage.reserve_bytes, 0);
        let err = load_file("[limits]\nreserve_bytes = 4096\n").unwrap_err();
        assert!(err.to_string().contains("reserve_bytes"), "{err}");
    }

    #[test]
    fn producer_limits_are_read_from_the_limits_table() {
        let c = load_file(
            "[limits]\nproducer_window_max = 128\nproducers_per_shard_max = 5\n\
             producer_idle_expiry_ms = 1000\n",
        )
        .unwrap();
        let b = c.limits.broker;
        assert_eq!(
            (
                b.producer_window_max,
                b.producers_per_shard_max,
                b.producer_idle_expiry_ms
            ),
            (128, 5, 1000)
        );
        let err = load_file("[limits]\nproducer_window_max = 100\n").unwrap_err();
        assert_eq!(err.key, "limits.producer_window_max", "{err}");
    }

    #[test]
    fn errors_name_the_file_and_the_key_users_write() {
        let err = load_file("[limits]\nprefetch_max = \"x\"\n").unwrap_err();
        assert_eq!(err.key, "limits.prefetch_max", "{err}");
        assert!(err.file.is_some(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(".toml: limits.prefetch_max: invalid type"),
            "{text}"
        );
        assert!(text.contains("(line 2)"), "{text}");
        // No internal names: not the untagged enum's, not the struct's, not a layer's.
        let err = load_file("cpus = 3\n").unwrap_err().to_string();
        assert!(err.contains("cpus: expected \"all\" or a list"), "{err}");
        assert!(!err.contains("CpusValue"), "{err}");
        let err = load_file("limits = 3\n").unwrap_err().to_string();
        assert!(!err.contains("FileLimits"), "{err}");
        let err = load_file("[limits]\ncommit_bytes_max = 1000\n").unwrap_err();
        assert_eq!(err.key, "limits.commit_bytes_max", "{err}");
        let err = load_file("[limits]\nframe_size_max = 100\n").unwrap_err();
        assert_eq!(err.key, "limits.frame_size_max", "{err}");
        assert!(
            err.to_string()
                .contains(".toml: limits.frame_size_max: 100"),
            "{err}"
        );
        // A value a variable set is named by the variable, not the file under it.
        let err = Config::load(&Flags::default(), |k| {
            (k == "WEIR_CPUS").then(|| "0,0".to_string())
        })
        .unwrap_err();
        assert_eq!((err.key.as_str(), err.file.as_ref()), ("WEIR_CPUS", None));
        let err = load_file("log_format = \"xml\"\n").unwrap_err();
        assert_eq!(err.key, "log_format", "{err}");
        assert_eq!(
            load_file("log_format = \"json\"\n").unwrap().log_format,
            LogFormat::Json
        );
    }

    #[test]
    fn the_admin_listener_is_configured_by_file_environment_and_flags() {
        assert_eq!(
            Config::default().admin_listen.map(|a| a.to_string()),
            Some("127.0.0.1:15680".to_string())
        );
        let c =
            load_file("admin_listen = \"0.0.0.0:9000\"\n[limits]\nadmin_metrics_queues_max = 7\n")
                .unwrap();
        assert_eq!(c.admin_listen.map(|a| a.port()), Some(9000));
        assert_eq!(c.limits.admin.admin_metrics_queues_max, 7);
        assert_eq!(
            load_file("admin_listen = \"off\"\n").unwrap().admin_listen,
            None
        );
        let err = load_file("admin_listen = \"nowhere\"\n").unwrap_err();
        assert_eq!(err.key, "admin_listen", "{err}");
        assert!(err.reason.contains("'nowhere'"), "{err}");
        let err = load_file("[limits]\nadmin_connections_max = 0\n").unwrap_err();
        assert_eq!(err.key, "limits.admin_connections_max", "{err}");
        let flags = Flags {
            admin_listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        };
        let c = Config::load(&flags, no_env).unwrap();
        assert_eq!(c.admin_listen.map(|a| a.port()), Some(0));
        let flags = Flags {
            admin_listen: Some("127.0.0.1:0".into()),
            no_admin: true,
            ..Default::default()
        };
        assert_eq!(Config::load(&flags, no_env).unwrap().admin_listen, None);
        let err = Config::load(&Flags::default(), |k| {
            (k == "WEIR_ADMIN_LISTEN").then(|| "x".to_string())
        })
        .unwrap_err();
        assert_eq!(err.key, "WEIR_ADMIN_LISTEN");
    }
}
