//! The admin listener: `/metrics` (Prometheus), the JSON API under `/api/`, `/health`, `/ready`
//! and the dashboard at `/`, over HTTP on `admin_listen`.
//!
//! Contract: runs on its own OS thread ("weir-admin": on the process's CPUs that run no shard if
//! there are any, and at nice 10, so the shards win every contest for a CPU) with a tokio
//! current-thread
//! runtime, started by `server` before any shard recovers, so `/health` and `/ready` answer during
//! recovery. It owns its listener, at most `admin_connections_max` HTTP connections, and one
//! weir-client connection to its own broker's main listener (`client_name` "weir-admin"). It
//! never touches shard state: every number and every change is a request of the wire protocol,
//! which the session gathers from the shards over the mesh in batches, so a slow scrape or a slow
//! HTTP reader costs the shards only the answers to those requests, and concurrent scrapes within
//! `SNAPSHOT_MAX_AGE` share one snapshot. The shards never call it. What it knows of recovery is
//! one atomic count `server` raises as each shard recovers.
//!
//! Faults handled: a broker that is not ready, not reachable or does not answer a request (an
//! older one: `UnsupportedFrame`) is an error body naming it (503, 501), and `/metrics` leaves
//! out what it could not get rather than failing whole; a dead broker connection is reopened on
//! the next request. Requests past `admin_request_timeout_ms` get 504, bodies past
//! `admin_body_bytes_max` 413. Nothing here panics on I/O; a failed accept is logged and retried.

mod api;
mod http;
mod link;
mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16};
use std::sync::Arc;
use std::time::Instant;

use crate::limits::{AdminLimits, Limits};

/// Everything the admin thread needs, moved to it at start.
pub struct AdminSetup {
    /// Bound by `server` with the other listeners (a port in use is a start-up error).
    pub listener: std::net::TcpListener,
    /// The broker's main listener, which the admin's client connects to.
    pub broker: SocketAddr,
    pub shard_count: u16,
    /// Shards that have recovered their journals and accept, raised by `server`.
    pub shards_ready: Arc<AtomicU16>,
    /// The broker's stop flag: `/ready` says 503 once it is set.
    pub stop: Arc<AtomicBool>,
    pub limits: Limits,
    /// CPUs this process may use that run no shard: the admin thread keeps to them if there are
    /// any (so it never takes a shard's core), and is left to the scheduler otherwise.
    pub spare_cpus: Vec<usize>,
}

/// What every request handler shares.
pub(crate) struct Admin {
    pub shard_count: u16,
    pub shards_ready: Arc<AtomicU16>,
    pub stop: Arc<AtomicBool>,
    pub limits: AdminLimits,
    pub started: Instant,
    pub link: link::Link,
    /// `/metrics` as last rendered, and the snapshot it was rendered from.
    pub rendered: tokio::sync::Mutex<Option<(Arc<link::Snapshot>, axum::body::Bytes)>>,
}

/// The admin thread's nice value. It shares the machine's CPUs with the shards, which are
/// pinned to them: at nice 10 a busy admin thread (a scrape storm) gets about a tenth of a CPU a
/// busy shard wants, so the shards win every contest for a core. Measured: a tight /metrics loop
/// at nice 0 took 20% of a core from a 2-vCPU broker at full load.
const ADMIN_NICE: libc::c_int = 10;

/// Binds the admin listener (blocking, before any shard starts).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Restricts the calling thread to `cpus` (sched_setaffinity); a refusal is logged only.
fn keep_to(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it for ids below
    // CPU_SETSIZE, and sched_setaffinity(0) changes only this thread's mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(
                "admin thread: cannot keep to CPUs {cpus:?}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Starts the admin thread; it serves until the process ends.
pub fn start(setup: AdminSetup) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("weir-admin".into())
        .spawn(move || {
            if !setup.spare_cpus.is_empty() {
                keep_to(&setup.spare_cpus);
            }
            // SAFETY: setpriority on this thread's own id changes only its scheduling weight.
            // Failure (a sandbox refusing it) leaves it at the broker's priority: logged only.
            let tid = unsafe { libc::gettid() };
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, ADMIN_NICE) } != 0
            {
                tracing::warn!(
                    "admin thread: cannot lower its priority: {}",
                    std::io::Error::last_os_error()
                );
            }
            runtime.block_on(async move {
                let admin = Arc::new(Admin {
                    shard_count: setup.shard_count,
                    shards_ready: setup.shards_ready,
                    stop: setup.stop,
                    limits: setup.limits.admin,
                    started: Instant::now(),
                    link: link::Link::new(setup.broker),
                    rendered: tokio::sync::Mutex::new(None),
                });
                if let Err(e) = http::serve(setup.listener, admin).await {
                    tracing::error!("admin listener stopped: {e}");
                }
            })
        })
}
