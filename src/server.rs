//! `weir serve`: from a checked configuration to running shards, and back to exit 0.
//!
//! Contract: runs on the main thread. It checks the CPUs against the process's affinity, locks
//! the data directory for the process's life (one broker per directory), checks (or records) its
//! shard layout (`datadir`: which generation's journals to open; other generations' leftovers of
//! a `weir data reshard` removed), binds every listener (so a port in use, by another broker too,
//! is one clear error, and port 0 resolves once for all shards), prints one ready line (the data
//! directory's absolute path, new or recovered with how many queues and messages, the fsync
//! policy with its interval, the admin address), starts one pinned executor per shard, each in
//! its `shard` tracing span, and joins them. SIGTERM and SIGINT set the stop flag the shards
//! watch. Nothing here is on the data path. The admin listener (`admin_listen`) is bound with the
//! others and its thread started before the shards, so `/health` and `/ready` answer during
//! recovery; the count of recovered shards it reports is raised here, as each says so.
//!
//! Faults handled: every start-up failure is a `ServeError` that names what and why; the process
//! exits non-zero with it before serving anything; an executor that could not start (a
//! locked-memory limit too low for glommio) is named with the limit and how to raise it. A
//! panic on any thread, a shard's above all, aborts the process (fail-stop,
//! `fail_stop_on_panic`).

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use weir_protocol::wire;

use crate::config::{Config, ConfigError, FsyncPolicy};
use crate::datadir::{self, LayoutError};
use crate::net::session::SessionCtx;
use crate::rt::executor::{spawn_pinned, ExecutorOptions};
use crate::rt::net::{bind_reuseport, bind_reuseport_first};
use crate::shard::{self, ShardSetup};

/// The broker's version, as `Welcome` and `weir --version` report it.
pub const BROKER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The data directory's lock: held (flock) by the broker serving it, and naming its pid.
const LOCK_FILE: &str = "weir.lock";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("data directory {dir}: {reason}")]
    Layout { dir: PathBuf, reason: String },
    #[error("data directory {dir} is in use by another weir ({holder})")]
    DataDirInUse { dir: PathBuf, holder: String },
    #[error("{what}: address {addr} is in use (by another process?)")]
    AddrInUse { what: String, addr: SocketAddr },
    #[error("recovery refused: {0}")]
    Recovery(String),
    #[error("shard {shard} failed: {reason}")]
    Shard { shard: u16, reason: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// Fail-stop: after the usual panic report, any panic aborts the whole process. Without it a
/// panicking shard's thread ends alone: its queues go unserved and its peers drop their batches
/// for it, while the broker still accepts connections and looks alive. Aborting lets a supervisor
/// restart it, and recovery from the journal is the one repair. A hook rather than
/// `panic = "abort"`: it holds in every profile, the debug binary the tests run included, and
/// changes nothing for the other binaries the workspace's release profile builds.
fn fail_stop_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("weir serve: a panic ends the broker (fail-stop); restart it to recover");
        std::process::abort();
    }));
}

/// A failed bind of `addr`: a port someone holds is said in words, anything else as it came.
fn bind_err(what: String, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> ServeError {
    move |source| match source.kind() {
        std::io::ErrorKind::AddrInUse => ServeError::AddrInUse { what, addr },
        _ => ServeError::Io {
            what: format!("{what} {addr}"),
            source,
        },
    }
}

/// Runs the broker until SIGTERM or SIGINT, then shuts down in order.
pub fn serve(config: Config) -> Result<(), ServeError> {
    fail_stop_on_panic();
    let allowed: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let cpus = config.shard_cpus(&allowed)?;
    let shard_count = cpus.len();
    // Held until the shards have stopped: the kernel drops it when the process ends, however.
    let _lock = lock_data_dir(&config.data_dir)?;
    // Before the layout is recorded: no layout means no broker ever served this directory.
    let fresh = !config.data_dir.join(crate::datadir::LAYOUT_FILE).exists();
    let generation = check_layout(&config.data_dir, shard_count)?;

    // Bind everything before starting anything.
    let first = bind_reuseport_first(config.listen)
        .map_err(bind_err("listen".to_string(), config.listen))?;
    let listen = first.local_addr();
    let mut main_listeners = vec![first];
    for _ in 1..shard_count {
        main_listeners
            .push(bind_reuseport(listen).map_err(bind_err("listen".to_string(), listen))?);
    }
    let mut shard_listeners = Vec::with_capacity(shard_count);
    for i in 0..shard_count {
        let port = if config.shard_port_base == 0 {
            0
        } else {
            config.shard_port_base + i as u16
        };
        let addr = SocketAddr::new(listen.ip(), port);
        shard_listeners
            .push(bind_reuseport_first(addr).map_err(bind_err(format!("shard {i} port"), addr))?);
    }
    let shard_ports: Vec<u16> = shard_listeners
        .iter()
        .map(|l| l.local_addr().port())
        .collect();
    let admin_listener = match config.admin_listen {
        Some(addr) => {
            Some(crate::admin::bind(addr).map_err(bind_err("admin_listen".to_string(), addr))?)
        }
        None => None,
    };
    let admin_addr = match &admin_listener {
        Some(l) => Some(l.local_addr().map_err(io("admin_listen"))?),
        None => None,
    };

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(io("installing signal handlers"))?;
    }
    let shards_ready = Arc::new(AtomicU16::new(0));
    if let Some(listener) = admin_listener {
        let setup = crate::admin::AdminSetup {
            listener,
            broker: listen,
            shard_count: shard_count as u16,
            shards_ready: shards_ready.clone(),
            stop: stop.clone(),
            limits: config.limits,
            spare_cpus: allowed
                .iter()
                .copied()
                .filter(|c| !cpus.contains(c))
                .collect(),
        };
        crate::admin::start(setup).map_err(io("starting the admin thread"))?;
        if let Some(addr) = admin_addr {
            tracing::info!("admin listening on {addr}");
        }
    }
    #[cfg(debug_assertions)]
    hold_before_recovery(&stop);

    let durability = match config.fsync {
        FsyncPolicy::Always => wire::Durability::Always,
        FsyncPolicy::Interval => wire::Durability::Interval,
        FsyncPolicy::Never => wire::Durability::Never,
    };
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let (recovered_tx, recovered_rx) = std::sync::mpsc::channel();
    let mut handles = Vec::with_capacity(shard_count);
    let listeners = main_listeners.into_iter().zip(shard_listeners);
    let meshes = crate::rt::mesh::full_mesh(
        shard_count,
        config.limits.broker.mesh_channel_capacity as usize,
    );
    for (i, (((main, own), cpu), mesh)) in
        listeners.zip(cpus.iter().copied()).zip(meshes).enumerate()
    {
        let journal_dir = datadir::shard_dir(&config.data_dir, generation, i);
        fs::create_dir_all(&journal_dir)
            .map_err(io(format!("creating {}", journal_dir.display())))?;
        let setup = ShardSetup {
            id: i as u16,
            journal_dir,
            recovered: recovered_tx.clone(),
            listeners: vec![main, own],
            session: SessionCtx {
                broker_version: BROKER_VERSION,
                shard: i as u16,
                shard_ports: shard_ports.clone(),
                durability,
                limits: config.limits.wire,
                publishes_in_flight_max: config.limits.broker.publishes_in_flight_max,
                prefetch_default: config.limits.broker.prefetch_default,
                prefetch_max: config.limits.broker.prefetch_max,
                targets_per_message_max: config.limits.broker.targets_per_message_max,
                delay_ms_max: config.limits.broker.delay_ms_max,
                connection_id: 0,
                started_ms,
                accepted_ms: 0,
                handshake_timeout_ms: config.limits.broker.handshake_timeout_ms,
                requests_in_flight_max: config.limits.broker.requests_in_flight_max,
                consumers_per_connection_max: config.limits.broker.consumers_per_connection_max,
                gets_unacked_max: config.limits.broker.gets_unacked_max,
                publish_bytes_in_flight_max: config.limits.broker.publish_bytes_in_flight_max,
                message_copy_bytes_max: config.limits.broker.message_copy_bytes_max,
                outbox_bytes_max: config.limits.broker.outbox_bytes_max,
                retry_delays_count_max: config.limits.broker.retry_delays_count_max,
            },
            limits: config.limits,
            mesh,
            stop: stop.clone(),
        };
        let options = ExecutorOptions {
            name: format!("weir-shard-{i}"),
            cpu,
            io_memory_bytes: config.io_memory_bytes,
            spin_before_park: Duration::from_micros(config.spin_before_park_us),
        };
        // Every log line of the shard's thread, its connections' included, names the shard.
        let span = tracing::info_span!("shard", shard = i);
        let run = move || tracing::Instrument::instrument(shard::run(setup), span);
        let handle = spawn_pinned(&options, run).map_err(|e| ServeError::Shard {
            shard: i as u16,
            reason: format!("cannot start on CPU {cpu}: {e}"),
        })?;
        handles.push(handle);
    }

    // Ready means recovered: every shard has replayed its journal before anyone is told to come.
    drop(recovered_tx);
    let mut failure = None;
    let mut found = Found {
        fresh,
        queues: 0,
        messages: 0,
    };
    for _ in 0..shard_count {
        match recovered_rx.recv() {
            Ok(Ok(recovered)) => {
                shards_ready.fetch_add(1, Ordering::Release);
                tracing::info!("{}", recovered.summary);
                found.queues += recovered.queues;
                found.messages += recovered.messages;
            }
            Ok(Err(reason)) => {
                // The others may be waiting for this one (the control plane's routing table
                // comes from shard 0): stop them now rather than wait for their answers.
                failure.get_or_insert(Some(reason));
                break;
            }
            Err(_) => {
                failure.get_or_insert(None);
                break;
            }
        }
    }
    if let Some(reason) = failure {
        stop.store(true, Ordering::Relaxed);
        // A shard that stopped without a word failed to start its executor: its join says why.
        let mut start_failure = None;
        for (i, handle) in handles.into_iter().enumerate() {
            if let Err(e) = handle.join() {
                start_failure.get_or_insert(ServeError::Shard {
                    shard: i as u16,
                    reason: executor_failure(&e, config.io_memory_bytes),
                });
            }
        }
        return Err(match (reason, start_failure) {
            (None, Some(e)) => e,
            (Some(reason), _) => ServeError::Recovery(reason),
            (None, None) => {
                ServeError::Recovery("a shard stopped before recovering its journal".to_string())
            }
        });
    }
    // The replay's scratch (every recovered message passed through a map) is freed by now, but
    // glibc keeps freed small chunks resident: about 80 bytes per recovered message, measured.
    // Hand them back before serving, so memory after a restart is the index, not its history.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory, taking each arena's lock; no pointer moves.
    unsafe {
        libc::malloc_trim(0);
    }
    ready_line(&config, listen, &shard_ports, &cpus, &found, admin_addr);

    let mut first_error = None;
    for (i, handle) in handles.into_iter().enumerate() {
        if let Err(e) = handle.join() {
            first_error.get_or_insert(ServeError::Shard {
                shard: i as u16,
                reason: e.to_string(),
            });
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Why a shard's executor did not start, in words a newcomer can act on. glommio locks memory
/// for io_uring and its DMA buffer pool (`io_memory_bytes`) as the executor starts; a locked-memory
/// limit (RLIMIT_MEMLOCK) too low for them fails there, with ENOMEM, before any journal is read.
fn executor_failure(e: &std::io::Error, io_memory_bytes: usize) -> String {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the one struct it is given.
    let known = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0;
    // glommio 0.9 refuses a soft limit under 512 KiB outright (`MemLockLimit(limit/minimum)`,
    // as its io::Error says it); an io_uring that cannot lock its rings fails with ENOMEM.
    let text = e.to_string();
    let memlock = text.contains("MemLockLimit")
        || e.raw_os_error() == Some(libc::ENOMEM)
        || text.contains("Cannot allocate memory");
    if memlock && known && limit.rlim_cur != libc::RLIM_INFINITY {
        format!(
            "cannot start its executor ({text}): the locked-memory limit (RLIMIT_MEMLOCK) is \
             {} KiB, too low for io_uring (glommio needs at least 512 KiB) and the DMA buffer \
             pool (io_memory_bytes = {io_memory_bytes} per shard). Raise it: \
             LimitMEMLOCK=infinity in the systemd unit (ops/weir.service), `ulimit -l unlimited` \
             in the shell that starts weir, or memlock in /etc/security/limits.conf; or lower \
             io_memory_bytes",
            limit.rlim_cur / 1024
        )
    } else {
        format!("cannot start its executor: {e}")
    }
}

/// What the data directory held when the broker started, for the ready line.
struct Found {
    /// No broker had served it before (no layout file): it starts empty.
    fresh: bool,
    /// Durable queues and their messages recovered, all shards.
    queues: u64,
    messages: u64,
}

/// One line on stdout once every listener is bound, for humans and for scripts and tests that
/// started the broker on port 0. The data directory is named by its absolute path and said to
/// be new or recovered (with what it held): the default `./weir-data` follows the working
/// directory, and a broker started from another one must not look like one that lost its data.
fn ready_line(
    config: &Config,
    listen: SocketAddr,
    shard_ports: &[u16],
    cpus: &[usize],
    found: &Found,
    admin: Option<SocketAddr>,
) {
    let ports: Vec<String> = shard_ports.iter().map(u16::to_string).collect();
    let cpus: Vec<String> = cpus.iter().map(usize::to_string).collect();
    let admin = admin.map_or_else(|| "off".to_string(), |a| a.to_string());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "weir ready: listen {listen} shard_ports {} cpus {} fsync {} data_dir {} admin {admin}",
        ports.join(","),
        cpus.join(","),
        fsync_words(config),
        data_dir_words(&config.data_dir, found)
    );
    let _ = out.flush();
}

/// The fsync policy as the ready line says it: `always`, `interval 5 ms`, `never`.
fn fsync_words(config: &Config) -> String {
    match config.fsync {
        FsyncPolicy::Interval => format!("interval {} ms", config.fsync_interval_ms),
        policy => policy.name().to_string(),
    }
}

/// `/abs/path (new: ...)` or `/abs/path (recovered: N durable queues, M messages)`.
fn data_dir_words(dir: &Path, found: &Found) -> String {
    let absolute = fs::canonicalize(dir)
        .or_else(|_| std::path::absolute(dir))
        .unwrap_or_else(|_| dir.to_path_buf());
    if found.fresh {
        format!(
            "{} (new: created empty, no earlier data here)",
            absolute.display()
        )
    } else {
        format!(
            "{} (recovered: {} durable queues, {} messages)",
            absolute.display(),
            found.queues,
            found.messages
        )
    }
}

/// Debug builds only: with `WEIR_TEST_HOLD_RECOVERY=FILE`, the shards start (and recover) only
/// once FILE exists, so a black-box test can watch `/ready` say 503 while recovery has not
/// finished, deterministically (`tests/admin.rs`). Release builds have no such door.
#[cfg(debug_assertions)]
fn hold_before_recovery(stop: &AtomicBool) {
    let Some(file) = std::env::var_os("WEIR_TEST_HOLD_RECOVERY") else {
        return;
    };
    while !Path::new(&file).exists() && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Creates the data directory if missing and takes its lock, or refuses a directory another
/// broker serves: two brokers on one journal would overwrite each other's confirmed messages.
/// The lock is an advisory `flock` on `LOCK_FILE`, held as long as the returned file is open;
/// the kernel drops it when the process dies, so a crash (SIGKILL) leaves no stale lock. The
/// holder's pid is written into the file for the refusal to name.
pub fn lock_data_dir(dir: &Path) -> Result<fs::File, ServeError> {
    use std::os::fd::AsRawFd;

    fs::create_dir_all(dir).map_err(io(format!("creating data directory {}", dir.display())))?;
    let path = dir.join(LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    // SAFETY: flock(2) on a file descriptor we own and keep open; it touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(ServeError::Io {
                what: format!("locking {}", path.display()),
                source: e,
            });
        }
        // The holder writes its pid just after it locks: it may not be there yet.
        let holder = fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
            .map_or_else(
                || "pid not yet recorded".to_string(),
                |pid| format!("pid {pid}"),
            );
        return Err(ServeError::DataDirInUse {
            dir: dir.to_path_buf(),
            holder,
        });
    }
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(io(format!("writing {}", path.display())))?;
    Ok(file)
}

/// Creates the data directory on first start and records its shard count; later starts must
/// match it, because each shard's journal holds the queues placed on it. Returns the layout's
/// generation (where the journals are, `datadir`), after removing other generations' leftovers
/// (an unfinished or a finished `weir data reshard`'s).
fn check_layout(dir: &Path, shards: usize) -> Result<u64, ServeError> {
    fs::create_dir_all(dir).map_err(io(format!("creating data directory {}", dir.display())))?;
    let layout_err = |e: LayoutError| match e {
        LayoutError::Invalid(reason) => ServeError::Layout {
            dir: dir.to_path_buf(),
            reason,
        },
        LayoutError::Io { what, source } => ServeError::Io { what, source },
    };
    match datadir::read_layout(dir).map_err(layout_err)? {
        Some(layout) => {
            let recorded = layout.shards;
            if recorded != shards {
                return Err(ServeError::Layout {
                    dir: dir.to_path_buf(),
                    reason: format!(
                        "it holds the queues of {recorded} shards, but this configuration runs \
                         {shards} (set cpus to {recorded} CPUs, or move the queues to {shards} \
                         shards with `weir data reshard --data-dir {} --shards {shards}` while no \
                         broker runs)",
                        dir.display()
                    ),
                });
            }
            datadir::remove_leftovers(dir, layout.generation).map_err(layout_err)?;
            Ok(layout.generation)
        }
        None => {
            let layout = datadir::Layout {
                shards,
                generation: 0,
            };
            datadir::write_layout(dir, layout, BROKER_VERSION).map_err(layout_err)?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_is_locked_while_its_lock_is_held() {
        let dir = std::env::temp_dir().join(format!("weir-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let held = lock_data_dir(&dir).unwrap();
        // flock locks an open file, not a process: a second open is refused like another broker.
        let err = lock_data_dir(&dir).unwrap_err().to_string();
        let expected = format!(
            "data directory {} is in use by another weir (pid {})",
            dir.display(),
            std::process::id()
        );
        assert_eq!(err, expected);
        drop(held);
        drop(lock_data_dir(&dir).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_data_directory_remembers_its_shard_count() {
        let dir = std::env::temp_dir().join(format!("weir-layout-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        check_layout(&dir, 2).unwrap();
        check_layout(&dir, 2).unwrap();
        let err = check_layout(&dir, 1).unwrap_err().to_string();
        assert!(
            err.contains("holds the queues of 2 shards, but this configuration runs 1"),
            "{err}"
        );
        fs::write(dir.join(datadir::LAYOUT_FILE), "format = 9\nshards = 2\n").unwrap();
        let err = check_layout(&dir, 2).unwrap_err().to_string();
        assert!(err.contains("layout format 9"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
