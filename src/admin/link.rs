//! The admin thread's one connection to its own broker, and the snapshot concurrent scrapes share.
//!
//! Contract: on the admin thread. The connection is opened on first use and reopened after it
//! dies (a broker that closed it, a restart of the session); requests on it are the wire
//! protocol's own, so their refusals are the protocol's errors, kept whole in `ApiError`. A
//! snapshot (status and the queue listing) younger than `SNAPSHOT_MAX_AGE` is shared by every
//! request that wants one; a scrape storm costs the shards one gather per interval.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use weir_client::{BrokerStatus, Client, ClientError, ClientOptions, ErrorCode, QueueInfo};

/// How long one snapshot serves every request that wants one.
pub(crate) const SNAPSHOT_MAX_AGE: Duration = Duration::from_millis(250);

/// Longest wait for the broker's `Welcome` on (re)connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A failed admin request: the HTTP status, the error's name (a wire `ErrorCode`'s name when the
/// broker refused) and the sentence.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub error: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error: error.to_string(),
            message: message.into(),
        }
    }
}

/// HTTP status for a wire error code: the same refusal, in HTTP's words.
fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::PreconditionFailed | ErrorCode::ResourceLocked | ErrorCode::Deleted => {
            StatusCode::CONFLICT
        }
        ErrorCode::AccessRefused => StatusCode::FORBIDDEN,
        ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorCode::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::LimitExceeded | ErrorCode::QueueFull => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::DiskFull => StatusCode::INSUFFICIENT_STORAGE,
        ErrorCode::UnsupportedFrame => StatusCode::NOT_IMPLEMENTED,
        ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn code_name(code: ErrorCode) -> String {
    code.variant_name()
        .map_or_else(|| format!("{}", code.0), str::to_string)
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> ApiError {
        match e {
            ClientError::Refused { code, message } => ApiError {
                status: status_of(code),
                error: code_name(code),
                message,
            },
            ClientError::InvalidArgument(message) => {
                ApiError::new(StatusCode::BAD_REQUEST, "InvalidArgument", message)
            }
            e @ ClientError::LimitExceeded { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "LimitExceeded", e.to_string())
            }
            e @ (ClientError::Closed(_)
            | ClientError::Io(_)
            | ClientError::ProtocolVersion { .. }) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "BrokerUnreachable",
                format!("the admin's connection to the broker: {e}"),
            ),
            e @ ClientError::Timeout { .. } => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "Timeout", e.to_string())
            }
            e => ApiError::new(StatusCode::BAD_GATEWAY, "UnexpectedReply", e.to_string()),
        }
    }
}

/// What `/metrics`, the overview and the dashboard read: one gather of each, at `taken`.
pub(crate) struct Snapshot {
    pub taken: Instant,
    pub status: Result<BrokerStatus, ApiError>,
    pub queues: Result<Vec<QueueInfo>, ApiError>,
}

pub(crate) struct Link {
    addr: SocketAddr,
    client: tokio::sync::Mutex<Option<Client>>,
    snapshot: tokio::sync::Mutex<Option<Arc<Snapshot>>>,
}

impl Link {
    pub fn new(addr: SocketAddr) -> Link {
        Link {
            addr,
            client: tokio::sync::Mutex::new(None),
            snapshot: tokio::sync::Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<Client, ApiError> {
        let mut held = self.client.lock().await;
        if let Some(c) = held.as_ref() {
            return Ok(c.clone());
        }
        let options = ClientOptions {
            name: "weir-admin".into(),
            connect_timeout: CONNECT_TIMEOUT,
            ..ClientOptions::single_connection()
        };
        let c = Client::connect(self.addr, options).await?;
        *held = Some(c.clone());
        Ok(c)
    }

    /// Forgets a connection that died, so the next request opens another.
    async fn forget_if_dead(&self, e: &ClientError) {
        if matches!(e, ClientError::Closed(_) | ClientError::Io(_)) {
            *self.client.lock().await = None;
        }
    }

    /// One request on the broker connection. A read (`retry`) on a connection found dead is
    /// tried once more on a new one: the old one died before it could be answered.
    pub async fn call<T, F, Fut>(&self, retry: bool, f: F) -> Result<T, ApiError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut tries = if retry { 2 } else { 1 };
        loop {
            tries -= 1;
            let c = self.client().await?;
            match f(c).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    self.forget_if_dead(&e).await;
                    let dead = matches!(e, ClientError::Closed(_));
                    if !(dead && tries > 0) {
                        return Err(e.into());
                    }
                }
            }
        }
    }

    /// The shared snapshot: the one taken within `SNAPSHOT_MAX_AGE`, or a new one. Requests
    /// that come while one is being taken wait for it rather than ask again.
    pub async fn snapshot(&self) -> Arc<Snapshot> {
        let mut held = self.snapshot.lock().await;
        if let Some(s) = held.as_ref() {
            if s.taken.elapsed() < SNAPSHOT_MAX_AGE {
                return s.clone();
            }
        }
        let status = self.call(true, |c| async move { c.status().await }).await;
        let queues = self
            .call(true, |c| async move { c.list_queues("").await })
            .await;
        let s = Arc::new(Snapshot {
            taken: Instant::now(),
            status,
            queues,
        });
        *held = Some(s.clone());
        s
    }

    /// After a change through the API: the next read sees it.
    pub async fn invalidate(&self) {
        *self.snapshot.lock().await = None;
    }
}
