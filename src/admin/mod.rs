//! The admin listener: `/metrics` (Prometheus), the JSON API under `/api/`, `/health`, `/ready`
//! and the dashboard at `/`, over HTTP on `admin_listen`.
//!
//! Contract: runs on its own OS thread ("weir-admin", unpinned) with a tokio current-thread
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

/// Binds the admin listener (blocking, before any shard starts).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Starts the admin thread; it serves until the process ends.
pub fn start(setup: AdminSetup) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("weir-admin".into())
        .spawn(move || {
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
