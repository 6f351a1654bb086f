//! The admin's HTTP side: the accept loop with its bounds, the routes, `/health`, `/ready` and
//! the dashboard's embedded files.
//!
//! Contract: on the admin thread. At most `admin_connections_max` connections are served at once
//! (the next accept waits for a slot: the rest wait in the kernel's backlog); a request's headers
//! must arrive within `admin_request_timeout_ms` and its answer is cut off after as long (504);
//! a body over `admin_body_bytes_max` is refused (413). HTTP/1.1 by hyper, routes by axum.

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
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let app = app.clone();
                async move {
                    let answer = tokio::time::timeout(timeout, app.oneshot(request)).await;
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
