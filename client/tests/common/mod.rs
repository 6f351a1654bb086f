//! Test harness: the real `weir` broker on 127.0.0.1 with ephemeral ports and a temporary data
//! directory, killed when dropped, and a bound on every wait.
//!
//! The broker binary belongs to another package, so cargo does not hand its path to these tests:
//! it is `<target dir>/<profile>/weir`, built once per test binary with `cargo build -p weir --bin
//! weir` (a no-op when it is fresh), so `cargo test -p weir-client` on a clean clone works and
//! never tests a stale broker. Nothing here synchronises by sleeping: the broker prints a ready
//! line when its listeners are bound, and every wait is bounded by `within`.

#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use weir_client::{Client, ClientOptions, Message};

/// Longest any single wait may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Awaits `f`, failing the test if it takes longer than `TIMEOUT`.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("client/ sits in the workspace")
        .to_path_buf()
}

/// The `weir` binary, built (or found fresh) once per test process.
///
/// It goes where cargo puts this test binary's own package binaries: this executable lives in
/// `<target dir>/<profile dir>/deps/`, so the broker is `<target dir>/<profile dir>/weir`, built
/// with the same profile into the same target directory (`CARGO_TARGET_DIR`, `--release` and
/// custom profiles included) and sharing its compiled dependencies.
pub fn broker_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(bin) = std::env::var_os("WEIR_BROKER_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.exists(),
                "WEIR_BROKER_BIN={} does not exist",
                bin.display()
            );
            return bin;
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binaries live in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("a target directory");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "weir",
                "--bin",
                "weir",
                "--profile",
                profile,
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(workspace_root())
            .stdout(Stdio::null())
            .output()
            .expect("run cargo build -p weir --bin weir");
        assert!(
            out.status.success(),
            "cargo build -p weir --bin weir failed (WEIR_BROKER_BIN=path skips it):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let binary = profile_dir.join("weir");
        assert!(binary.exists(), "no broker binary at {}", binary.display());
        binary
    })
}

/// A fresh directory under cargo's per-test temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("client-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// A running broker, killed with SIGKILL when dropped.
pub struct Broker {
    child: Child,
    extra: Vec<String>,
    pub listen: SocketAddr,
    pub shard_ports: Vec<u16>,
    pub data_dir: PathBuf,
    /// Keep the data directory when dropped (a restart reuses it).
    keep_data: bool,
}

impl Broker {
    /// `weir serve` on ephemeral ports, data in a fresh directory named after `name`, with
    /// `extra` arguments; returns once its ready line is printed.
    pub fn start(name: &str, extra: &[&str]) -> Broker {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Broker::start_in(temp_dir(name), extra)
    }

    /// Kills the broker with SIGKILL and starts it again on the same data directory (new ports).
    pub fn restart(mut self) -> Broker {
        self.keep_data = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
        Broker::start_in(self.data_dir.clone(), std::mem::take(&mut self.extra))
    }

    fn start_in(data_dir: PathBuf, extra: Vec<String>) -> Broker {
        let mut child = Command::new(broker_binary())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--shard-port-base",
                "0",
                "--data-dir",
            ])
            .arg(&data_dir)
            .args(&extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start weir serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = line_tx.send(line);
        });
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut all = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut all);
            let _ = err_tx.send(all);
        });
        let line = line_rx
            .recv_timeout(TIMEOUT)
            .expect("weir serve printed no ready line in time");
        if !line.starts_with("weir ready:") {
            let _ = child.kill();
            let err = err_rx.recv_timeout(TIMEOUT).unwrap_or_default();
            panic!("weir serve did not start: stdout {line:?}, stderr {err}");
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let field = |name: &str| {
            let i = words
                .iter()
                .position(|w| *w == name)
                .unwrap_or_else(|| panic!("no {name} in {line}"));
            words[i + 1].to_string()
        };
        Broker {
            listen: field("listen").parse().expect("listen address"),
            shard_ports: field("shard_ports")
                .split(',')
                .map(|p| p.parse().expect("shard port"))
                .collect(),
            child,
            extra,
            data_dir,
            keep_data: false,
        }
    }

    /// Starts a broker with a configuration file holding `toml`.
    pub fn start_with_config(name: &str, toml: &str, extra: &[&str]) -> Broker {
        let path = temp_dir(&format!("{name}-config")).join("weir.toml");
        std::fs::write(&path, toml).expect("write the configuration file");
        let config = path.to_str().expect("a UTF-8 temporary path").to_string();
        let mut args = vec!["--config", config.as_str()];
        args.extend_from_slice(extra);
        Broker::start(name, &args)
    }

    /// Sends SIGTERM: the broker's orderly shutdown.
    pub fn terminate(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
    }

    pub fn shard_count(&self) -> u16 {
        self.shard_ports.len() as u16
    }

    pub async fn client(&self) -> Client {
        self.client_with(ClientOptions::default()).await
    }

    pub async fn client_with(&self, options: ClientOptions) -> Client {
        within("connect", Client::connect(self.listen, options))
            .await
            .expect("connect to the broker")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Segments are preallocated (64 MiB each): a suite that kept them would fill a disk. A
        // failing test keeps its data directory for a look.
        if !self.keep_data && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

pub fn messages(prefix: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("{prefix} {i}")))
        .collect()
}

pub fn bodies(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix} {i}").into_bytes())
        .collect()
}

/// A queue name whose hash places it on `shard` of `shards`, by the client's placement function.
pub fn queue_on(shard: u16, shards: u16, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|n| weir_client::placement(n, shards) == shard)
        .expect("some name hashes to every shard")
}
