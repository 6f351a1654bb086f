//! The JSON admin API under `/api/`: listings and the declare/delete/purge/bind requests, each
//! one request of the wire protocol on the admin's broker connection.
//!
//! Contract: on the admin thread. Bodies are parsed strictly (an unknown or mistyped field is a
//! 400 naming it); a broker refusal keeps its `ErrorCode`'s name and sentence
//! (`{"error": "NotFound", "message": "..."}`) with the HTTP status `link::ApiError` maps it to;
//! before every shard has recovered, every call is a 503 saying how many have.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use weir_client::{
    BindingInfo, ConnectionInfo, ConsumerInfo, ExchangeInfo, ExchangeKind, ExchangeOptions,
    Overflow, QueueArguments, QueueInfo, QueueOptions,
};

use super::http::error_response;
use super::link::ApiError;
use super::Admin;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.status, &self.error, &self.message)
    }
}

type Answer = Result<Response, ApiError>;

fn ok(v: Value) -> Answer {
    Ok((StatusCode::OK, Json(v)).into_response())
}

/// Refuses every call until every shard has recovered: until then the broker's listener accepts
/// nothing, and a connection would only wait.
fn ready(admin: &Admin) -> Result<(), ApiError> {
    let ready = admin.shards_ready.load(Ordering::Acquire);
    if ready < admin.shard_count {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "NotReady",
            format!(
                "{ready} of {} shards have recovered their journals",
                admin.shard_count
            ),
        ));
    }
    Ok(())
}

/// A request body as `T`; the error names the field at fault (`arguments.max_length`).
fn parse<T: for<'de> Deserialize<'de>>(bytes: &Bytes) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!(" {path}:")
        };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            format!("request body:{at} {}", e.inner()),
        )
    })
}

/// As `parse`; an empty body is `T::default()`.
fn body<T: for<'de> Deserialize<'de> + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse(bytes)
}

pub(super) fn queue_json(q: &QueueInfo) -> Value {
    let a = &q.arguments;
    json!({
        "name": q.name,
        "shard": q.shard,
        "durable": q.durable,
        "exclusive": q.exclusive,
        "auto_delete": q.auto_delete,
        "messages_ready": q.messages_ready,
        "messages_unacked": q.messages_unacked,
        "messages_delayed": q.messages_delayed,
        "messages_retrying": q.messages_retrying,
        "bytes_ready": q.bytes_ready,
        "bytes_unacked": q.bytes_unacked,
        "consumers": q.consumers,
        "oldest_ready_age_ms": q.oldest_ready_age_ms,
        "expires_in_ms": q.expires_in_ms,
        "active_consumer": q.active_consumer,
        "messages_published": q.messages_published,
        "messages_delivered": q.messages_delivered,
        "messages_redelivered": q.messages_redelivered,
        "messages_acked": q.messages_acked,
        "messages_nacked": q.messages_nacked,
        "messages_dead_lettered": q.messages_dead_lettered,
        "messages_expired": q.messages_expired,
        "messages_dropped": q.messages_dropped,
        "arguments": {
            "max_length": a.max_length,
            "max_length_bytes": a.max_length_bytes,
            "overflow": overflow_name(a.overflow),
            "message_ttl_ms": a.message_ttl_ms,
            "dead_letter_exchange": a.dead_letter_exchange,
            "dead_letter_routing_key": a.dead_letter_routing_key,
            "max_deliveries": a.max_deliveries,
            "shard": a.shard,
            "priority_max": a.priority_max,
            "expires_ms": a.expires_ms,
            "single_active_consumer": a.single_active_consumer,
            "retry_delays_ms": a.retry_delays_ms,
        },
    })
}

fn overflow_name(o: Overflow) -> &'static str {
    match o {
        Overflow::DropHead => "drop_head",
        Overflow::RejectPublish => "reject_publish",
    }
}

fn exchange_json(e: &ExchangeInfo) -> Value {
    json!({
        "name": e.name,
        "kind": e.kind.map(ExchangeKind::name),
        "durable": e.durable,
        "auto_delete": e.auto_delete,
        "bindings": e.bindings,
    })
}

fn binding_json(b: &BindingInfo) -> Value {
    json!({ "exchange": b.exchange, "queue": b.queue, "binding_key": b.binding_key })
}

fn connection_json(c: &ConnectionInfo) -> Value {
    json!({
        "id": c.id,
        "shard": c.shard,
        "peer": c.peer,
        "client_name": c.client_name,
        "connected_ms": c.connected_ms,
        "consumers": c.consumers,
        "deliveries_unacked": c.deliveries_unacked,
        "publishes_unconfirmed": c.publishes_unconfirmed,
        "outbox_bytes": c.outbox_bytes,
        "bytes_received": c.bytes_received,
        "bytes_sent": c.bytes_sent,
    })
}

fn consumer_json(c: &ConsumerInfo) -> Value {
    json!({
        "queue": c.queue,
        "tag": c.tag,
        "shard": c.shard,
        "connection": c.connection,
        "prefetch": c.prefetch,
        "unacked": c.unacked,
        "auto_ack": c.auto_ack,
        "priority": c.priority,
        "active": c.active,
    })
}

/// The broker at a glance: what the dashboard's header shows.
pub(super) async fn overview(State(admin): State<Arc<Admin>>) -> Answer {
    ready(&admin)?;
    let snapshot = admin.link.snapshot().await;
    let status = snapshot.status.clone()?;
    let queues = snapshot.queues.as_ref().ok();
    let counters: serde_json::Map<String, Value> = status
        .counters
        .iter()
        .map(|(name, value)| (name.clone(), json!(value)))
        .collect();
    let histograms: Vec<Value> = status
        .histograms
        .iter()
        .map(|h| {
            json!({
                "name": h.name, "shard": h.shard, "count": h.count, "sum": h.sum,
                "p50": h.p50, "p99": h.p99, "p999": h.p999, "max": h.max,
            })
        })
        .collect();
    let sum = |f: fn(&QueueInfo) -> u64| queues.map(|qs| qs.iter().map(f).sum::<u64>());
    ok(json!({
        "broker_version": status.broker_version,
        "shard_count": status.shard_count,
        "shards_ready": admin.shards_ready.load(Ordering::Acquire),
        "uptime_ms": status.uptime_ms,
        "connections": status.connections,
        "queues": status.queues,
        "messages_ready": sum(|q| q.messages_ready),
        "messages_unacked": sum(|q| q.messages_unacked),
        "messages_delayed": sum(|q| q.messages_delayed),
        "counters": counters,
        "gauges": status.gauges,
        "histograms": histograms,
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Prefix {
    #[serde(default)]
    prefix: String,
}

pub(super) async fn queues(State(admin): State<Arc<Admin>>, Query(p): Query<Prefix>) -> Answer {
    ready(&admin)?;
    let snapshot = admin.link.snapshot().await;
    let queues = snapshot.queues.clone()?;
    let list: Vec<Value> = queues
        .iter()
        .filter(|q| q.name.starts_with(&p.prefix))
        .map(queue_json)
        .collect();
    ok(Value::Array(list))
}

pub(super) async fn queue(State(admin): State<Arc<Admin>>, Path(name): Path<String>) -> Answer {
    ready(&admin)?;
    let q = admin
        .link
        .call(true, |c| {
            let name = name.clone();
            async move { c.queue_info(&name).await }
        })
        .await?;
    ok(queue_json(&q))
}

/// A queue declaration's body: the options and arguments of weir-client's `QueueOptions`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct DeclareQueue {
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
    passive: bool,
    arguments: Arguments,
}

impl Default for DeclareQueue {
    fn default() -> Self {
        DeclareQueue {
            durable: true,
            exclusive: false,
            auto_delete: false,
            passive: false,
            arguments: Arguments::default(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Arguments {
    max_length: Option<u64>,
    max_length_bytes: Option<u64>,
    overflow: OverflowName,
    message_ttl_ms: Option<u32>,
    dead_letter_exchange: Option<String>,
    dead_letter_routing_key: Option<String>,
    max_deliveries: Option<u32>,
    shard: Option<u16>,
    priority_max: u8,
    expires_ms: Option<u32>,
    single_active_consumer: bool,
    retry_delays_ms: Vec<u32>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum OverflowName {
    #[default]
    DropHead,
    RejectPublish,
}

pub(super) async fn declare_queue(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Answer {
    ready(&admin)?;
    let d: DeclareQueue = body(&bytes)?;
    if d.exclusive {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            "exclusive: an exclusive queue belongs to the connection that declares it, and the \
             admin API has none to give it; declare it from the client that uses it",
        ));
    }
    let a = d.arguments;
    let options = QueueOptions {
        durable: d.durable,
        exclusive: false,
        auto_delete: d.auto_delete,
        passive: d.passive,
        arguments: QueueArguments {
            max_length: a.max_length,
            max_length_bytes: a.max_length_bytes,
            overflow: match a.overflow {
                OverflowName::DropHead => Overflow::DropHead,
                OverflowName::RejectPublish => Overflow::RejectPublish,
            },
            message_ttl_ms: a.message_ttl_ms,
            dead_letter_exchange: a.dead_letter_exchange,
            dead_letter_routing_key: a.dead_letter_routing_key,
            max_deliveries: a.max_deliveries,
            shard: a.shard,
            priority_max: a.priority_max,
            expires_ms: a.expires_ms,
            single_active_consumer: a.single_active_consumer,
            retry_delays_ms: a.retry_delays_ms,
        },
    };
    let q = admin
        .link
        .call(false, |c| {
            let (name, options) = (name.clone(), options.clone());
            async move { c.declare(&name, options).await }
        })
        .await?;
    admin.link.invalidate().await;
    ok(queue_json(&q))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct DeleteQueue {
    if_unused: bool,
    if_empty: bool,
}

pub(super) async fn delete_queue(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    Query(d): Query<DeleteQueue>,
) -> Answer {
    ready(&admin)?;
    let messages = admin
        .link
        .call(false, |c| {
            let name = name.clone();
            async move { c.delete(&name, d.if_unused, d.if_empty).await }
        })
        .await?;
    admin.link.invalidate().await;
    ok(json!({ "deleted": name, "messages": messages }))
}

pub(super) async fn purge_queue(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
) -> Answer {
    ready(&admin)?;
    let messages = admin
        .link
        .call(false, |c| {
            let name = name.clone();
            async move { c.purge(&name).await }
        })
        .await?;
    admin.link.invalidate().await;
    ok(json!({ "purged": name, "messages": messages }))
}

pub(super) async fn exchanges(State(admin): State<Arc<Admin>>, Query(p): Query<Prefix>) -> Answer {
    ready(&admin)?;
    let list = admin
        .link
        .call(true, |c| {
            let prefix = p.prefix.clone();
            async move { c.list_exchanges(&prefix).await }
        })
        .await?;
    ok(Value::Array(list.iter().map(exchange_json).collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeclareExchange {
    kind: String,
    #[serde(default = "yes")]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    passive: bool,
}

fn yes() -> bool {
    true
}

pub(super) async fn declare_exchange(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Answer {
    ready(&admin)?;
    let d: DeclareExchange = parse(&bytes)?;
    let kind: ExchangeKind = d.kind.parse().map_err(|e: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            format!("kind: {e}"),
        )
    })?;
    let options = ExchangeOptions {
        durable: d.durable,
        auto_delete: d.auto_delete,
        passive: d.passive,
    };
    admin
        .link
        .call(false, |c| {
            let name = name.clone();
            async move { c.declare_exchange(&name, kind, options).await }
        })
        .await?;
    ok(json!({ "declared": name, "kind": kind.name() }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct DeleteExchange {
    if_unused: bool,
}

pub(super) async fn delete_exchange(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    Query(d): Query<DeleteExchange>,
) -> Answer {
    ready(&admin)?;
    admin
        .link
        .call(false, |c| {
            let name = name.clone();
            async move { c.delete_exchange(&name, d.if_unused).await }
        })
        .await?;
    ok(json!({ "deleted": name }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct BindingFilter {
    exchange: Option<String>,
    queue: Option<String>,
}

pub(super) async fn bindings(
    State(admin): State<Arc<Admin>>,
    Query(f): Query<BindingFilter>,
) -> Answer {
    ready(&admin)?;
    let list = admin
        .link
        .call(true, |c| {
            let (e, q) = (f.exchange.clone(), f.queue.clone());
            async move { c.list_bindings(e.as_deref(), q.as_deref()).await }
        })
        .await?;
    ok(Value::Array(list.iter().map(binding_json).collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BindingBody {
    exchange: String,
    queue: String,
    #[serde(default)]
    binding_key: String,
}

async fn binding(admin: Arc<Admin>, bytes: Bytes, bind: bool) -> Answer {
    ready(&admin)?;
    let b: BindingBody = parse(&bytes)?;
    admin
        .link
        .call(false, |c| {
            let (e, q, k) = (b.exchange.clone(), b.queue.clone(), b.binding_key.clone());
            async move {
                if bind {
                    c.bind(&q, &e, &k).await
                } else {
                    c.unbind(&q, &e, &k).await
                }
            }
        })
        .await?;
    let what = if bind { "bound" } else { "unbound" };
    ok(json!({ what: { "exchange": b.exchange, "queue": b.queue, "binding_key": b.binding_key } }))
}

pub(super) async fn bind(State(admin): State<Arc<Admin>>, bytes: Bytes) -> Answer {
    binding(admin, bytes, true).await
}

pub(super) async fn unbind(State(admin): State<Arc<Admin>>, bytes: Bytes) -> Answer {
    binding(admin, bytes, false).await
}

pub(super) async fn connections(State(admin): State<Arc<Admin>>) -> Answer {
    ready(&admin)?;
    let list = admin
        .link
        .call(true, |c| async move { c.list_connections().await })
        .await?;
    ok(Value::Array(list.iter().map(connection_json).collect()))
}

pub(super) async fn consumers(State(admin): State<Arc<Admin>>, Query(p): Query<Prefix>) -> Answer {
    ready(&admin)?;
    let list = admin
        .link
        .call(true, |c| {
            let prefix = p.prefix.clone();
            async move { c.list_consumers(&prefix).await }
        })
        .await?;
    ok(Value::Array(list.iter().map(consumer_json).collect()))
}
