//! The admin's HTTP side: the accept loop with its bounds, the routes, `/health`, `/ready` and
//! the dashboard's embedded files.
//!
//! Contract: on the admin thread. At most `admin_connections_max` connections are served at once
//! (the next accept waits for a slot: the rest wait in the kernel's backlog); a request's headers
//! must arrive within `admin_request_timeout_ms` and its answer is cut off after as long (504);
//! a body over `admin_body_bytes_max` is refused (413); at most `admin_requests_per_second_max`
//! requests are answered a second, all connections together (`Pace`: a request past the pace
//! waits its turn, inside its timeout). HTTP/1.1 by hyper, routes by axum.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tower::ServiceExt;

use super::{api, metrics, Admin};

const DASHBOARD_HTML: &str = include_str!("assets/dashboard.html");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");

pub(super) fn router(admin: Arc<Admin>) -> Router {
    let body_max = usize::try_from(admin.limits.admin_body_bytes_max).unwrap_or(usize::MAX);
    Router::new()
        .route("/", get(dashboard))
        .route("/dashboard.js", get(dashboard_js))
        .route("/dashboard.css", get(dashboard_css))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics::scrape))
        .route("/api/overview", get(api::overview))
        .route("/api/queues", get(api::queues))
        .route(
            "/api/queues/{name}",
            get(api::queue)
                .put(api::declare_queue)
                .delete(api::delete_queue),
        )
        .route("/api/queues/{name}/purge", post(api::purge_queue))
        .route("/api/exchanges", get(api::exchanges))
        .route(
            "/api/exchanges/{name}",
            axum::routing::put(api::declare_exchange).delete(api::delete_exchange),
        )
        .route(
            "/api/bindings",
            get(api::bindings).post(api::bind).delete(api::unbind),
        )
        .route("/api/connections", get(api::connections))
        .route("/api/consumers", get(api::consumers))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(admin)
}

/// Serves until the process ends.
pub(super) async fn serve(
    listener: std::net::TcpListener,
    admin: Arc<Admin>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let timeout = Duration::from_millis(admin.limits.admin_request_timeout_ms);
    let slots = Arc::new(tokio::sync::Semaphore::new(
        admin.limits.admin_connections_max as usize,
    ));
    let pace = Arc::new(Pace::new(admin.limits.admin_requests_per_second_max));
    let app = router(admin);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, a connection reset before accept: not fatal.
                tracing::warn!("admin listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        let pace = pace.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let app = app.clone();
                let pace = pace.clone();
                async move {
                    let answer = tokio::time::timeout(timeout, async {
                        pace.turn().await;
                        app.oneshot(request).await
                    })
                    .await;
                    Ok::<_, std::convert::Infallible>(match answer {
                        Ok(Ok(response)) => response,
                        Ok(Err(never)) => match never {},
                        Err(_) => error_response(
                            StatusCode::GATEWAY_TIMEOUT,
                            "Timeout",
                            &format!(
                                "no answer within admin_request_timeout_ms ({} ms)",
                                timeout.as_millis()
                            ),
                        ),
                    })
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!("admin connection: {e}");
            }
            drop(slot);
        });
    }
}

/// The pace of answers: each request takes the next free turn, one every `1 / rate` seconds,
/// and waits for it. Why: answering costs the admin thread a wake-up and a write and the client
/// as much, on the CPUs the shards use, so an unpaced scraping loop takes CPU from the data path
/// however cheap the answer itself is (the snapshot is shared). Turns are handed out in arrival
/// order and none is saved up beyond now, so a burst after a quiet spell is paced too.
struct Pace {
    interval: Duration,
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl Pace {
    fn new(per_second: u32) -> Pace {
        Pace {
            interval: Duration::from_secs(1) / per_second.max(1),
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits for this request's turn. Only the admin thread takes the lock, never across an
    /// await, so it is never contended.
    async fn turn(&self) {
        let now = tokio::time::Instant::now();
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let at = (*next).max(now);
            *next = at + self.interval;
            at
        };
        if at > now {
            tokio::time::sleep_until(at).await;
        }
    }
}

pub(super) fn error_response(status: StatusCode, error: &str, message: &str) -> Response {
    (status, Json(json!({ "error": error, "message": message }))).into_response()
}

async fn not_found() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        "no such admin path: see /api/ in the README (Monitoring)",
    )
}

async fn health() -> Response {
    (StatusCode::OK, Json(json!({ "status": "up" }))).into_response()
}

/// 200 once every shard has recovered and accepts, 503 before (and once stopping).
async fn ready(State(admin): State<Arc<Admin>>) -> Response {
    let ready = admin.shards_ready.load(Ordering::Acquire);
    let stopping = admin.stop.load(Ordering::Relaxed);
    let ok = ready >= admin.shard_count && !stopping;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ok,
        "shards_ready": ready,
        "shard_count": admin.shard_count,
        "stopping": stopping,
    });
    (status, Json(body)).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn dashboard() -> Response {
    asset("text/html; charset=utf-8", DASHBOARD_HTML)
}

async fn dashboard_js() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

async fn dashboard_css() -> Response {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_past_the_pace_wait_their_turn() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let pace = Pace::new(50);
            let start = tokio::time::Instant::now();
            // The first turn is now; the 10 after it are 20 ms apart: not before 200 ms.
            for _ in 0..11 {
                pace.turn().await;
            }
            assert!(start.elapsed() >= Duration::from_millis(200));
            // None saved up while idle: after a pause, a burst is paced again.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let burst = tokio::time::Instant::now();
            for _ in 0..6 {
                pace.turn().await;
            }
            assert!(burst.elapsed() >= Duration::from_millis(100));
        });
    }
}
