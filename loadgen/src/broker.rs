//! `--spawn-broker`: a `weir serve` child on a temporary data directory, stopped and cleaned up
//! whatever happens.
//!
//! Contract: owned by the main thread. `SpawnedBroker::start` finds the binary, starts it on
//! ephemeral ports (`--listen 127.0.0.1:0 --shard-port-base 0`) with the chosen profile, and waits
//! for its ready line. Dropping it (normal end, error, panic unwinding) sends SIGTERM, waits, then
//! SIGKILLs a broker that will not stop, and removes the data directory: journal segments are
//! 64 MiB preallocated files and must never be left behind. The child runs in its own process
//! group, so a Ctrl-C at the terminal reaches the loadgen only and the loadgen stops the broker
//! in order; and it gets SIGTERM if the loadgen dies without unwinding (PR_SET_PDEATHSIG).
//!
//! Faults handled: no binary (the error names the places looked and the build command), a broker
//! that exits or prints something else instead of its ready line (its stderr is shown), one that
//! does not get ready in time.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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
    let Some(cargo) = std::env::var_os("CARGO") else {
        return;
    };
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
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ws).args(["build", "--bin", "weir"]);
    if release {
        cmd.arg("--release");
    }
    eprintln!(
        "weir-loadgen: building the broker first: cargo build{} --bin weir",
        if release { " --release" } else { "" }
    );
    match cmd.status() {
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
    child: Option<Child>,
    /// Removed when dropped (after the broker has stopped).
    data_dir: Option<tempfile::TempDir>,
    /// The address from its ready line.
    pub listen: String,
    /// Its whole ready line.
    pub ready_line: String,
    stderr: mpsc::Receiver<String>,
}

impl SpawnedBroker {
    /// Starts `weir serve --config PROFILE --data-dir TMP --listen 127.0.0.1:0
    /// --shard-port-base 0 EXTRA...` and waits for its ready line.
    pub fn start(
        bin: &WeirBin,
        profile: Option<&Path>,
        extra: &[String],
    ) -> Result<SpawnedBroker, String> {
        let data_dir = tempfile::Builder::new()
            .prefix("weir-loadgen-")
            .tempdir()
            .map_err(|e| format!("creating a temporary data directory: {e}"))?;
        let mut cmd = Command::new(&bin.path);
        cmd.arg("serve");
        if let Some(p) = profile {
            cmd.arg("--config").arg(p);
        }
        cmd.arg("--data-dir")
            .arg(data_dir.path())
            .args(["--listen", "127.0.0.1:0", "--shard-port-base", "0"])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("WEIR_LOADGEN_BROKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches only the child's own settings.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.path.display()))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            if let Some(out) = stdout {
                let mut out = BufReader::new(out);
                let _ = out.read_line(&mut line);
                let _ = line_tx.send(line);
                // Keep draining so the broker never blocks on a full pipe.
                let _ = std::io::copy(&mut out, &mut std::io::sink());
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep only the tail: a long run's log must not grow without bound.
            let mut tail = String::new();
            if let Some(mut err) = stderr {
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    tail.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if tail.len() > 64 * 1024 {
                        let cut = tail.len() - 32 * 1024;
                        let cut = (cut..tail.len())
                            .find(|i| tail.is_char_boundary(*i))
                            .unwrap_or(tail.len());
                        tail.drain(..cut);
                    }
                }
            }
            let _ = err_tx.send(tail);
        });
        let mut broker = SpawnedBroker {
            child: Some(child),
            data_dir: Some(data_dir),
            listen: String::new(),
            ready_line: String::new(),
            stderr: err_rx,
        };
        let line = match line_rx.recv_timeout(READY_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let err = broker.stop_and_collect();
                return Err(format!(
                    "weir serve printed no ready line within {READY_TIMEOUT:?}; its stderr:\n{err}"
                ));
            }
        };
        if !line.starts_with("weir ready:") {
            let err = broker.stop_and_collect();
            return Err(format!(
                "weir serve did not start (stdout {:?}); its stderr:\n{err}",
                line.trim()
            ));
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let listen = words
            .iter()
            .position(|w| *w == "listen")
            .and_then(|i| words.get(i + 1))
            .ok_or_else(|| format!("no listen address in the ready line {line:?}"))?;
        broker.listen = listen.to_string();
        broker.ready_line = line.trim().to_string();
        Ok(broker)
    }

    /// The broker's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The temporary data directory.
    pub fn data_dir(&self) -> Option<&Path> {
        self.data_dir.as_ref().map(tempfile::TempDir::path)
    }

    /// SIGTERM, wait (SIGKILL past `STOP_TIMEOUT`), remove the data directory. Returns the
    /// broker's exit status as words and its stderr tail.
    pub fn stop(mut self) -> (String, String) {
        let status = self.terminate();
        let err = self
            .stderr
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        self.remove_data();
        (status, err)
    }

    fn stop_and_collect(&mut self) -> String {
        self.terminate();
        let err = self
            .stderr
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        self.remove_data();
        err
    }

    fn terminate(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return "already stopped".into();
        };
        if let Ok(Some(status)) = child.try_wait() {
            return format!("had exited by itself ({status})");
        }
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return format!("stopped by SIGTERM ({status})"),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return format!("did not stop within {STOP_TIMEOUT:?} of SIGTERM: killed");
                }
            }
        }
    }

    fn remove_data(&mut self) {
        if let Some(dir) = self.data_dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!(
                    "weir-loadgen: could not remove the broker's data directory {}: {e}",
                    path.display()
                );
            }
        }
    }
}

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        self.terminate();
        self.remove_data();
    }
}
