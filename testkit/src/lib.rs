//! weir-testkit: `weir serve` as a child process, for the black-box test harnesses and for
//! `weir-loadgen --spawn-broker`.
//!
//! Contract: a [`Broker`] is owned by the thread that started it. [`Serve`] describes one (the
//! binary, its data directory, extra arguments, its log filter); [`Serve::start`] runs it on
//! ephemeral ports (`--listen 127.0.0.1:0 --shard-port-base 0`) and returns once the broker has
//! printed its ready line, with the addresses read from that line. Nothing synchronises by
//! sleeping: the ready line is the signal, and every wait has a bound. Dropping a `Broker`
//! SIGKILLs and reaps it and removes its data directory (journal segments are 64 MiB
//! preallocated files: a suite that kept them would fill a disk), unless it was kept
//! ([`Broker::keep_data`]) or the thread is panicking: then the broker's stderr is printed and
//! the directory stays for a look. [`Serve::start_and_kill_within`] is a crash during start-up
//! (SIGKILL at most a given time after the start, before or just after the ready line), for
//! crash loops that kill during recovery too.
//!
//! Faults handled: a binary that will not run, and a broker that exits, prints something else or
//! prints nothing in time instead of its ready line ([`StartError`], carrying its stderr; a
//! temporary data directory is removed then, a given one kept); a broker that ignores SIGTERM
//! (SIGKILLed past the bound given to [`Broker::stop`]). stdout is drained and only stderr's tail
//! is kept, so a broker never blocks on a full pipe and a long run's log never grows unbounded.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

/// How the broker's ready line starts (`src/server.rs`).
pub const READY_PREFIX: &str = "weir ready:";

/// The stderr kept: past `STDERR_TAIL_MAX` bytes, the oldest are cut down to `STDERR_TAIL_KEEP`.
const STDERR_TAIL_MAX: usize = 64 * 1024;
const STDERR_TAIL_KEEP: usize = 32 * 1024;
/// How long the stderr reader may take to finish once the broker has exited.
const STDERR_WAIT: Duration = Duration::from_secs(5);

/// A `weir serve` to start.
#[derive(Debug, Clone)]
pub struct Serve {
    bin: PathBuf,
    data: DataSpec,
    args: Vec<OsString>,
    rust_log: String,
    /// Environment variables set for the broker, beside `RUST_LOG`.
    env: Vec<(OsString, OsString)>,
    stderr_file: Option<PathBuf>,
    ready_timeout: Duration,
    own_process_group: bool,
}

#[derive(Debug, Clone)]
enum DataSpec {
    Dir(PathBuf),
    Temp { parent: PathBuf, prefix: String },
}

impl Serve {
    /// `bin serve` on a fresh temporary data directory, `RUST_LOG=warn`, ready within 20 s.
    pub fn new(bin: impl Into<PathBuf>) -> Serve {
        Serve {
            bin: bin.into(),
            data: DataSpec::Temp {
                parent: std::env::temp_dir(),
                prefix: "weir-".into(),
            },
            args: Vec::new(),
            rust_log: "warn".into(),
            env: Vec::new(),
            stderr_file: None,
            ready_timeout: Duration::from_secs(20),
            own_process_group: false,
        }
    }

    /// Data in `dir` (created by the broker if missing), removed when the broker is dropped.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Serve {
        self.data = DataSpec::Dir(dir.into());
        self
    }

    /// Data in a fresh directory `parent/prefix…`.
    pub fn temp_data_dir(mut self, parent: impl Into<PathBuf>, prefix: &str) -> Serve {
        self.data = DataSpec::Temp {
            parent: parent.into(),
            prefix: prefix.into(),
        };
        self
    }

    /// Arguments after the kit's own (`serve`, the listeners, `--data-dir`).
    pub fn args<I, S>(mut self, args: I) -> Serve
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// The broker's `RUST_LOG`.
    pub fn rust_log(mut self, filter: impl Into<String>) -> Serve {
        self.rust_log = filter.into();
        self
    }

    /// An environment variable for the broker (for a debug build's test hooks), set per broker
    /// so that tests running side by side do not share it.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Serve {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// stderr into a file (created afresh at each start) instead of being captured.
    pub fn stderr_to_file(mut self, path: impl Into<PathBuf>) -> Serve {
        self.stderr_file = Some(path.into());
        self
    }

    pub fn ready_timeout(mut self, timeout: Duration) -> Serve {
        self.ready_timeout = timeout;
        self
    }

    /// The broker runs in its own process group, so a Ctrl-C at the terminal reaches only us
    /// (who then stop it in order), and gets SIGTERM if the thread that started it dies
    /// (PR_SET_PDEATHSIG). Only for a broker started by a thread that outlives it: the main one.
    pub fn own_process_group(mut self) -> Serve {
        self.own_process_group = true;
        self
    }

    /// Starts the broker and waits for its ready line.
    pub fn start(self) -> Result<Broker, StartError> {
        let data = match &self.data {
            DataSpec::Dir(dir) => Data::Dir(dir.clone()),
            DataSpec::Temp { parent, prefix } => Data::Temp(
                tempfile::Builder::new()
                    .prefix(prefix)
                    .tempdir_in(parent)
                    .map_err(StartError::TempDir)?,
            ),
        };
        self.start_on(data)
    }

    /// The command `start` runs, for a test that expects the broker to refuse to start and
    /// wants its exit status and output. Needs a given data directory ([`Serve::data_dir`]): a
    /// temporary one is made by `start`.
    pub fn command(&self) -> Command {
        match &self.data {
            DataSpec::Dir(dir) => self.command_on(dir),
            DataSpec::Temp { .. } => panic!("Serve::command needs Serve::data_dir"),
        }
    }

    /// A crash during start-up: runs the broker on its given data directory
    /// ([`Serve::data_dir`]), waits at most `after` for its ready line, then SIGKILLs and reaps
    /// it, whether it was ready or not. `Ok(true)`: it had printed its ready line (the kill came
    /// just after it was ready), `Ok(false)`: it was still recovering (or had exited: a broker
    /// that fails to start is found by the next [`Serve::start`]). The directory is kept, for
    /// the next start; stderr is discarded. `after` is a kill point, not a synchronisation: the
    /// caller checks whatever state the kill left, wherever it landed.
    pub fn start_and_kill_within(&self, after: Duration) -> Result<bool, StartError> {
        let mut cmd = self.command();
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(|source| StartError::Io {
            what: format!("starting {}", self.bin.display()),
            source,
        })?;
        let ready = first_line_then_drain(child.stdout.take());
        let was_ready = matches!(
            ready.recv_timeout(after),
            Ok(line) if line.starts_with(READY_PREFIX)
        );
        let _ = child.kill();
        let _ = child.wait();
        Ok(was_ready)
    }

    fn command_on(&self, data_dir: &Path) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shard-port-base",
            "0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(&self.args)
        .env("RUST_LOG", &self.rust_log)
        .envs(self.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
        if self.own_process_group {
            cmd.process_group(0);
            // SAFETY: prctl is async-signal-safe and touches only the child's own settings.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    fn start_on(self, data: Data) -> Result<Broker, StartError> {
        let data_dir = data.path().to_path_buf();
        let mut cmd = self.command_on(&data_dir);
        cmd.stdout(Stdio::piped());
        match &self.stderr_file {
            Some(path) => {
                cmd.stderr(
                    std::fs::File::create(path).map_err(|source| StartError::Io {
                        what: format!("creating {}", path.display()),
                        source,
                    })?,
                )
            }
            None => cmd.stderr(Stdio::piped()),
        };
        let mut child = cmd.spawn().map_err(|source| StartError::Io {
            what: format!("starting {}", self.bin.display()),
            source,
        })?;
        let ready = first_line_then_drain(child.stdout.take());
        let stderr = stderr_tail(child.stderr.take());
        let timeout = self.ready_timeout;
        let mut broker = Broker {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            shard_ports: Vec::new(),
            ready_line: String::new(),
            data_dir,
            admin: None,
            child: Some(child),
            data: Some(data),
            keep: false,
            stderr,
            stderr_text: None,
            spec: self,
        };
        let line = match ready.recv_timeout(timeout) {
            Ok(line) => line,
            Err(_) => {
                return Err(broker.failed(|stderr| StartError::NoReadyLine { timeout, stderr }))
            }
        };
        if !line.starts_with(READY_PREFIX) {
            let stdout = line.trim().to_string();
            return Err(broker.failed(|stderr| StartError::NotReady { stdout, stderr }));
        }
        let line = line.trim().to_string();
        let words: Vec<&str> = line.split_whitespace().collect();
        let field = |name: &str| {
            let i = words.iter().position(|w| *w == name)?;
            words.get(i + 1).copied()
        };
        let bad = |what: &'static str| StartError::ReadyLine {
            what,
            line: line.clone(),
        };
        broker.listen = field("listen")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| bad("listen address"))?;
        broker.shard_ports = field("shard_ports")
            .and_then(|ports| ports.split(',').map(|p| p.parse().ok()).collect())
            .ok_or_else(|| bad("shard_ports"))?;
        broker.admin = match field("admin") {
            Some("off") => None,
            Some(a) => Some(a.parse().map_err(|_| bad("admin address"))?),
            None => return Err(bad("admin address")),
        };
        broker.ready_line = line;
        Ok(broker)
    }
}

/// Why a broker did not start.
#[derive(Debug)]
pub enum StartError {
    TempDir(io::Error),
    Io { what: String, source: io::Error },
    NoReadyLine { timeout: Duration, stderr: String },
    NotReady { stdout: String, stderr: String },
    ReadyLine { what: &'static str, line: String },
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::TempDir(e) => write!(f, "creating a temporary data directory: {e}"),
            StartError::Io { what, source } => write!(f, "{what}: {source}"),
            StartError::NoReadyLine { timeout, stderr } => write!(
                f,
                "weir serve printed no ready line within {timeout:?}; its stderr:\n{stderr}"
            ),
            StartError::NotReady { stdout, stderr } => write!(
                f,
                "weir serve did not start (stdout {stdout:?}); its stderr:\n{stderr}"
            ),
            StartError::ReadyLine { what, line } => {
                write!(f, "no {what} in the ready line {line:?}")
            }
        }
    }
}

impl std::error::Error for StartError {}

/// How [`Broker::stop`] ended the broker; `Display` says so in words.
#[derive(Debug, Clone, Copy)]
pub enum Stopped {
    AlreadyStopped,
    ExitedByItself(ExitStatus),
    Terminated(ExitStatus),
    Killed {
        after: Duration,
        status: Option<ExitStatus>,
    },
}

impl Stopped {
    pub fn status(&self) -> Option<ExitStatus> {
        match *self {
            Stopped::AlreadyStopped => None,
            Stopped::ExitedByItself(s) | Stopped::Terminated(s) => Some(s),
            Stopped::Killed { status, .. } => status,
        }
    }
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stopped::AlreadyStopped => write!(f, "already stopped"),
            Stopped::ExitedByItself(s) => write!(f, "had exited by itself ({s})"),
            Stopped::Terminated(s) => write!(f, "stopped by SIGTERM ({s})"),
            Stopped::Killed { after, .. } => {
                write!(f, "did not stop within {after:?} of SIGTERM: killed")
            }
        }
    }
}

/// A broker's memory, bytes: its resident set now and at its peak (since start or
/// `Broker::reset_peak_memory`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

/// A running `weir serve`.
pub struct Broker {
    /// The client port, from the ready line.
    pub listen: SocketAddr,
    /// Each shard's own port, in shard order, from the ready line.
    pub shard_ports: Vec<u16>,
    /// The whole ready line, trimmed.
    pub ready_line: String,
    pub data_dir: PathBuf,
    /// The admin HTTP listener's address, from the ready line (`None`: `--no-admin`).
    pub admin: Option<SocketAddr>,
    child: Option<Child>,
    /// `None` once removed or handed on to a restart.
    data: Option<Data>,
    keep: bool,
    stderr: mpsc::Receiver<String>,
    stderr_text: Option<String>,
    spec: Serve,
}

impl Broker {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The broker's memory as the kernel counts it (`/proc/<pid>/status`): what tests of the
    /// broker's memory bounds assert on.
    pub fn memory(&self) -> io::Result<Memory> {
        let pid = self
            .pid()
            .ok_or_else(|| io::Error::other("the broker was already stopped"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kib| kib * 1024)
                .ok_or_else(|| io::Error::other(format!("no {name} in /proc/{pid}/status")))
        };
        Ok(Memory {
            rss_bytes: field("VmRSS:")?,
            peak_rss_bytes: field("VmHWM:")?,
        })
    }

    /// Resets the broker's peak resident set (`VmHWM`) to its current one (`clear_refs`, 5), so
    /// a later `memory()` says the peak of what came after.
    pub fn reset_peak_memory(&self) -> io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| io::Error::other("the broker was already stopped"))?;
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
    }

    /// Sends SIGTERM (the broker's orderly shutdown) and returns at once.
    pub fn signal_term(&self) -> io::Result<()> {
        match &self.child {
            Some(child) => sigterm(child),
            None => Err(io::Error::other("the broker was already stopped")),
        }
    }

    /// SIGKILL (no shutdown at all, as in a crash) and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits, without signalling it, for the broker to exit by itself: its status, or `None` if
    /// it still runs after `timeout` (it is left running then, for the drop to kill).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Some(status);
                }
                // Polling the exit status: the only wait std offers with a deadline.
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }

    /// SIGTERM, then waits for the exit; SIGKILL past `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> Stopped {
        let Some(mut child) = self.child.take() else {
            return Stopped::AlreadyStopped;
        };
        if let Ok(Some(status)) = child.try_wait() {
            return Stopped::ExitedByItself(status);
        }
        let _ = sigterm(&child);
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Stopped::Terminated(status),
                // Polling the exit status: the only wait std offers with a deadline.
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    return Stopped::Killed {
                        after: timeout,
                        status,
                    };
                }
            }
        }
    }

    /// What the broker wrote to stderr (its tail). Complete once the broker has exited; while it
    /// runs this waits a few seconds and returns what it has (nothing, when stderr went to a file).
    pub fn stderr(&mut self) -> String {
        if self.stderr_text.is_none() {
            if let Ok(text) = self.stderr.recv_timeout(STDERR_WAIT) {
                self.stderr_text = Some(text);
            }
        }
        self.stderr_text.clone().unwrap_or_default()
    }

    /// Keeps the data directory when dropped (a broker started on it next).
    pub fn keep_data(&mut self) {
        self.keep = true;
    }

    /// Removes the data directory now (the broker should have stopped).
    pub fn remove_data(&mut self) -> io::Result<()> {
        match self.data.take() {
            Some(data) => data.remove(),
            None => Ok(()),
        }
    }

    /// SIGKILL, then the same broker again on the same data directory (new ports).
    pub fn restart(mut self) -> Result<Broker, StartError> {
        self.kill();
        let data = self
            .data
            .take()
            .expect("a broker has its data until dropped");
        self.spec.clone().start_on(data)
    }

    /// A start that went wrong: the broker is killed, a temporary data directory removed.
    fn failed(mut self, error: impl FnOnce(String) -> StartError) -> StartError {
        self.kill();
        let stderr = self.stderr();
        // A given directory stays: perhaps left by a crash, what the broker refused is evidence.
        if let Some(data @ Data::Temp(_)) = self.data.take() {
            let _ = data.remove();
        }
        error(stderr)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let Some(data) = self.data.take() else {
            return;
        };
        if std::thread::panicking() {
            let stderr = self.stderr();
            eprintln!(
                "--- weir serve stderr ---\n{stderr}--- end ---\ndata directory kept: {}",
                self.data_dir.display()
            );
            data.keep();
        } else if self.keep {
            data.keep();
        } else if let Err(e) = data.remove() {
            eprintln!(
                "could not remove the broker's data directory {}: {e}",
                self.data_dir.display()
            );
        }
    }
}

/// SIGTERM to a child not reaped yet (reaping takes it by `&mut`), so its pid names no other
/// process.
fn sigterm(child: &Child) -> io::Result<()> {
    // SAFETY: kill(2) only sends a signal; the pid is our unreaped child's.
    if unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

enum Data {
    /// The caller's: a plain directory.
    Dir(PathBuf),
    Temp(tempfile::TempDir),
}

impl Data {
    fn path(&self) -> &Path {
        match self {
            Data::Dir(p) => p,
            Data::Temp(t) => t.path(),
        }
    }

    fn keep(self) {
        if let Data::Temp(t) = self {
            let _ = t.keep();
        }
    }

    fn remove(self) -> io::Result<()> {
        match self {
            Data::Dir(p) => match std::fs::remove_dir_all(p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            Data::Temp(t) => t.close(),
        }
    }
}

/// The first line of stdout (empty at end of stream), then stdout drained to the end.
fn first_line_then_drain(stdout: Option<ChildStdout>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = stdout {
        std::thread::spawn(move || {
            let mut out = BufReader::new(out);
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            let _ = tx.send(line);
            let _ = io::copy(&mut out, &mut io::sink());
        });
    }
    rx
}

/// stderr's tail, sent when the stream ends. No stream: the sender is dropped at once.
fn stderr_tail(stderr: Option<ChildStderr>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut err) = stderr {
        std::thread::spawn(move || {
            let mut tail = String::new();
            let mut buf = [0u8; 8192];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.push_str(&String::from_utf8_lossy(&buf[..n]));
                if tail.len() > STDERR_TAIL_MAX {
                    let cut = tail.len() - STDERR_TAIL_KEEP;
                    let cut = (cut..tail.len())
                        .find(|i| tail.is_char_boundary(*i))
                        .unwrap_or(tail.len());
                    tail.drain(..cut);
                }
            }
            let _ = tx.send(tail);
        });
    }
    rx
}

/// The workspace this kit sits in.
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ sits in the workspace")
}

/// `cargo build -p weir --bin weir` into `profile_dir` (`<target dir>/<profile dir>`): the same
/// target directory and profile, so the broker shares the compiled dependencies already there.
pub fn cargo_build_weir(profile_dir: &Path) -> Command {
    let target_dir = profile_dir.parent().unwrap_or(profile_dir);
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "weir", "--bin", "weir", "--profile", profile])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace_root());
    cmd
}

/// The `weir` binary for the tests of another package (cargo hands `CARGO_BIN_EXE_weir` only to
/// the `weir` package's own): `$WEIR_BROKER_BIN`, or built once per test process with
/// [`cargo_build_weir`] next to the test binary's own package binaries (a no-op when fresh), so
/// a clean clone's `cargo test -p weir-client` works and never tests a stale broker.
///
/// A test binary lives in `<target dir>/<profile dir>/deps/`; the broker goes to
/// `<target dir>/<profile dir>/weir` (`CARGO_TARGET_DIR`, `--release` and custom profiles
/// included). Panics when it cannot be had: it is for tests.
pub fn weir_binary() -> &'static Path {
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
        let out = cargo_build_weir(profile_dir)
            .arg("--quiet")
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

/// A fresh, empty directory `parent/name-<pid>` (emptied if a previous run left it).
pub fn fresh_dir(parent: impl AsRef<Path>, name: &str) -> PathBuf {
    let dir = parent
        .as_ref()
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("create the directory {}: {e}", dir.display()));
    dir
}
