//! `--spawn-broker`: a `weir serve` child on a temporary data directory, stopped and cleaned up
//! whatever happens.
//!
//! Contract: owned by the main thread. `find_weir` finds the binary; `SpawnedBroker::start`
//! starts it with the chosen profile through weir-testkit (ephemeral ports, its own process
//! group so a Ctrl-C at the terminal reaches the loadgen only and the loadgen stops the broker
//! in order, SIGTERM if the loadgen dies without unwinding) and waits for its ready line.
//! Dropping it (normal end, error, panic unwinding) sends SIGTERM, waits, then SIGKILLs a broker
//! that will not stop, and removes the data directory: journal segments are 64 MiB preallocated
//! files and must never be left behind.
//!
//! Faults handled: no binary (the error names the places looked and the build command), a broker
//! that exits or prints something else instead of its ready line (its stderr is shown), one that
//! does not get ready in time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use weir_testkit::{Broker, Serve};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the `weir` binary is, and how it was found.
#[derive(Debug, Clone)]
pub struct WeirBin {
    /// The binary.
    pub path: PathBuf,
    /// How it was found, for the report.
    pub how: String,
}

/// Finds `weir`: `--weir-bin`, then `WEIR_BIN`, then next to this executable (the same target
/// directory), then `target/release/weir` and `target/debug/weir` under the current directory.
/// Run by `cargo run` (which sets `CARGO`) from this workspace with none given, it first has cargo
/// build the broker in the same profile, so the broker matches the sources it runs against.
pub fn find_weir(explicit: Option<&Path>) -> Result<WeirBin, String> {
    if let Some(p) = explicit {
        return executable(p, "--weir-bin");
    }
    if let Some(p) = std::env::var_os("WEIR_BIN") {
        return executable(Path::new(&p), "WEIR_BIN");
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    if let Some(dir) = &exe_dir {
        build_with_cargo_if_run_by_it(dir);
    }
    let mut looked = Vec::new();
    let mut candidates: Vec<(PathBuf, &str)> = Vec::new();
    if let Some(dir) = &exe_dir {
        candidates.push((dir.join("weir"), "next to weir-loadgen"));
    }
    candidates.push((PathBuf::from("target/release/weir"), "target/release"));
    candidates.push((PathBuf::from("target/debug/weir"), "target/debug"));
    for (p, how) in candidates {
        if p.is_file() {
            return Ok(WeirBin {
                path: p.canonicalize().unwrap_or(p),
                how: how.to_string(),
            });
        }
        looked.push(p.display().to_string());
    }
    Err(format!(
        "the weir binary was not found (looked at {}); build it with `cargo build --release --bin weir` \
         from the repository root, or pass --weir-bin PATH (or set WEIR_BIN)",
        looked.join(", ")
    ))
}

fn executable(p: &Path, how: &str) -> Result<WeirBin, String> {
    if p.is_file() {
        Ok(WeirBin {
            path: p.to_path_buf(),
            how: how.to_string(),
        })
    } else {
        Err(format!("{how}: {} is not a file", p.display()))
    }
}

/// Under `cargo run` in this workspace: `cargo build [--release] --bin weir`, so that
/// `cargo run --release -p weir-loadgen -- --spawn-broker` works from a fresh clone and never
/// measures a stale broker. Anywhere else (an installed binary, a test) this does nothing.
fn build_with_cargo_if_run_by_it(exe_dir: &Path) {
    if std::env::var_os("CARGO").is_none() {
        return;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if !workspace.join("src/main.rs").is_file()
        || std::env::var_os("WEIR_LOADGEN_NO_BUILD").is_some()
    {
        return;
    }
    // Only when this executable lives in that workspace's target directory.
    let (Ok(exe_dir), Ok(ws)) = (exe_dir.canonicalize(), workspace.canonicalize()) else {
        return;
    };
    if !exe_dir.starts_with(&ws) {
        return;
    }
    let release = exe_dir.file_name().is_some_and(|n| n == "release");
    eprintln!(
        "weir-loadgen: building the broker first: cargo build{} --bin weir",
        if release { " --release" } else { "" }
    );
    match weir_testkit::cargo_build_weir(&exe_dir).status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!(
            "weir-loadgen: cargo build --bin weir failed ({s}); looking for an existing binary"
        ),
        Err(e) => {
            eprintln!("weir-loadgen: could not run cargo ({e}); looking for an existing binary")
        }
    }
}

/// A running `weir serve`, stopped and cleaned up when dropped.
pub struct SpawnedBroker {
    /// `None` only while a restart is under way (and after a failed one).
    broker: Option<Broker>,
    /// The address from its ready line.
    pub listen: String,
    /// Its whole ready line.
    pub ready_line: String,
}

impl SpawnedBroker {
    /// Starts `weir serve --listen 127.0.0.1:0 --shard-port-base 0 --data-dir TMP
    /// [--config PROFILE] EXTRA...` and waits for its ready line.
    pub fn start(
        bin: &WeirBin,
        profile: Option<&Path>,
        extra: &[String],
    ) -> Result<SpawnedBroker, String> {
        let mut serve = Serve::new(&bin.path)
            .temp_data_dir(std::env::temp_dir(), "weir-loadgen-")
            .ready_timeout(READY_TIMEOUT)
            .own_process_group()
            .rust_log(std::env::var("WEIR_LOADGEN_BROKER_LOG").unwrap_or_else(|_| "warn".into()));
        if let Some(p) = profile {
            serve = serve.args([Path::new("--config"), p]);
        }
        let broker = serve.args(extra).start().map_err(|e| e.to_string())?;
        Ok(SpawnedBroker {
            listen: broker.listen.to_string(),
            ready_line: broker.ready_line.clone(),
            broker: Some(broker),
        })
    }

    /// The broker's process id.
    pub fn pid(&self) -> Option<u32> {
        self.broker.as_ref().and_then(Broker::pid)
    }

    /// The temporary data directory.
    pub fn data_dir(&self) -> Option<&Path> {
        self.broker.as_ref().map(|b| b.data_dir.as_path())
    }

    /// `--chaos`: SIGKILL (no shutdown at all, as in a crash), then the same broker on the same
    /// data directory, waiting for its ready line (new ports: `listen` changes). On the main
    /// thread only, like `start`. A broker that does not come back is an error; its data
    /// directory is removed then (the error carries its stderr).
    pub fn kill_and_restart(&mut self) -> Result<(), String> {
        let broker = self
            .broker
            .take()
            .ok_or_else(|| "the broker did not come back from an earlier restart".to_string())?;
        let broker = broker.restart().map_err(|e| e.to_string())?;
        self.listen = broker.listen.to_string();
        self.ready_line = broker.ready_line.clone();
        self.broker = Some(broker);
        Ok(())
    }

    /// `drain-after-restart`: SIGTERM (the broker's orderly shutdown) and wait for its exit
    /// (SIGKILL past `STOP_TIMEOUT`), keeping the data directory for `start_again`. Returns the
    /// exit as words ("stopped by SIGTERM (exit status: 0)" when it went as it should).
    pub fn terminate(&mut self) -> Result<String, String> {
        let broker = self
            .broker
            .as_mut()
            .ok_or_else(|| "the broker did not come back from an earlier restart".to_string())?;
        Ok(broker.stop(STOP_TIMEOUT).to_string())
    }

    /// After `terminate`: the same broker (binary, profile, flags) on the same data directory,
    /// waiting for its ready line (new ephemeral ports: `listen` changes). On the main thread
    /// only, like `start`. A broker that does not come back is an error (its stderr in it).
    pub fn start_again(&mut self) -> Result<(), String> {
        let broker = self
            .broker
            .take()
            .ok_or_else(|| "the broker did not come back from an earlier restart".to_string())?;
        // `restart` SIGKILLs first: a no-op here, `terminate` reaped the process already.
        let broker = broker.restart().map_err(|e| e.to_string())?;
        self.listen = broker.listen.to_string();
        self.ready_line = broker.ready_line.clone();
        self.broker = Some(broker);
        Ok(())
    }

    /// SIGTERM, wait (SIGKILL past `STOP_TIMEOUT`), remove the data directory. Returns the
    /// broker's exit status as words and its stderr tail.
    pub fn stop(mut self) -> (String, String) {
        let status = self.finish();
        let stderr = self.broker.as_mut().map(Broker::stderr).unwrap_or_default();
        (status, stderr)
    }

    fn finish(&mut self) -> String {
        let Some(broker) = self.broker.as_mut() else {
            return "gone (a restart failed)".to_string();
        };
        let status = broker.stop(STOP_TIMEOUT).to_string();
        if let Err(e) = broker.remove_data() {
            eprintln!(
                "weir-loadgen: could not remove the broker's data directory {}: {e}",
                broker.data_dir.display()
            );
        }
        status
    }
}

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        self.finish();
    }
}
