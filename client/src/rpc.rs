//! Request-reply: a private reply queue, correlation ids, timeouts, many requests in flight.
//!
//! Contract: a `Requester` owns one server-named, exclusive, auto-delete queue (it goes when
//! the connection does) and one auto-ack consumer on it, read by a task spawned on the caller's
//! tokio runtime. Each request gets a fresh correlation id and the reply queue as `reply_to`,
//! is published mandatory (a request nobody is bound to receive fails at once with `Returned`
//! instead of timing out), and waits for the reply whose correlation id is its own. Replies that
//! arrive after their request timed out, or with an unknown correlation id, are dropped.
//!
//! Faults handled: the request refused or returned (its error), no reply within the timeout
//! (`Timeout`; a late reply is dropped), the reply consumer ending (every waiting request fails
//! with the consumer's error).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::client::{Client, PublishOptions};
use crate::consumer::{ConsumeOptions, Delivery};
use crate::error::ClientError;
use crate::message::Message;
use crate::queue::QueueOptions;

/// How long `Requester::request` waits for a reply unless told otherwise.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

type Waiting = Mutex<Option<HashMap<String, oneshot::Sender<Result<Delivery, ClientError>>>>>;

struct Shared {
    client: Client,
    reply_queue: String,
    /// Requests awaiting their reply by correlation id, shared with the reader task; `None`
    /// once the reply consumer ended.
    waiting: Arc<Waiting>,
    next: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Sends requests and matches their replies. Clone it freely: clones share the reply queue, and
/// any number of requests may be in flight at once.
#[derive(Clone)]
pub struct Requester {
    shared: Arc<Shared>,
    timeout: Duration,
}

impl Client {
    /// A requester with its own reply queue (server-named, exclusive, auto-delete).
    pub async fn requester(&self) -> Result<Requester, ClientError> {
        let options = QueueOptions {
            durable: false,
            exclusive: true,
            auto_delete: true,
            ..QueueOptions::default()
        };
        let reply_queue = self.declare("", options).await?.name;
        let consume = ConsumeOptions {
            auto_ack: true,
            ..ConsumeOptions::default()
        };
        let mut replies = self.consume(&reply_queue, consume).await?;
        let waiting: Arc<Waiting> = Arc::new(Mutex::new(Some(HashMap::new())));
        let table = waiting.clone();
        let reader = tokio::spawn(async move {
            let ended = loop {
                match replies.recv().await {
                    Some(Ok(reply)) => {
                        let id = reply.correlation_id().unwrap_or_default().to_string();
                        let tx = table.lock().ok().and_then(|mut w| w.as_mut()?.remove(&id));
                        if let Some(tx) = tx {
                            let _ = tx.send(Ok(reply));
                        }
                    }
                    Some(Err(e)) => break e,
                    None => break ClientError::Closed(crate::error::CloseReason::Local),
                }
            };
            let left = table.lock().ok().and_then(|mut w| w.take());
            for (_, tx) in left.into_iter().flatten() {
                let _ = tx.send(Err(copy_of(&ended)));
            }
        });
        let shared = Arc::new(Shared {
            client: self.clone(),
            reply_queue,
            waiting,
            next: AtomicU64::new(1),
            reader,
        });
        Ok(Requester {
            shared,
            timeout: REQUEST_TIMEOUT_DEFAULT,
        })
    }
}

impl Requester {
    /// The same requester with another reply timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Requester {
        self.timeout = timeout;
        self
    }

    /// The private queue replies come to (the `reply_to` of every request).
    pub fn reply_queue(&self) -> &str {
        &self.shared.reply_queue
    }

    /// Publishes `message` to `exchange` with `routing_key` as a request and waits for its
    /// reply: `Returned` if it routes to no queue, `Refused` if the broker refuses it, `Timeout`
    /// if no reply comes in time.
    pub async fn request(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
    ) -> Result<Delivery, ClientError> {
        let n = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", self.shared.reply_queue);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.shared.waiting.lock().map_err(|_| poisoned())?;
            let Some(waiting) = waiting.as_mut() else {
                return Err(ClientError::Closed(crate::error::CloseReason::Local));
            };
            waiting.insert(id.clone(), tx);
        }
        let message = message
            .correlation_id(id.clone())
            .reply_to(self.shared.reply_queue.clone());
        let options = PublishOptions {
            exchange: exchange.to_string(),
            mandatory: true,
        };
        let outcome = async {
            let confirm = self
                .shared
                .client
                .publish_with(&options, routing_key, message)
                .await?;
            // The reply may come before the confirm (a fast responder, a slow fsync): whichever
            // fails first, or the reply, decides.
            tokio::pin!(confirm);
            let mut rx = rx;
            let mut confirmed = false;
            loop {
                tokio::select! {
                    reply = &mut rx => {
                        return reply.unwrap_or(Err(ClientError::Closed(crate::error::CloseReason::Local)));
                    }
                    c = &mut confirm, if !confirmed => {
                        c?;
                        confirmed = true;
                    }
                }
            }
        };
        let result = match tokio::time::timeout(self.timeout, outcome).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                what: "reply",
                after: self.timeout,
            }),
        };
        if result.is_err() {
            if let Ok(mut waiting) = self.shared.waiting.lock() {
                if let Some(w) = waiting.as_mut() {
                    w.remove(&id);
                }
            }
        }
        result
    }
}

impl std::fmt::Debug for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requester")
            .field("reply_queue", &self.shared.reply_queue)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn poisoned() -> ClientError {
    ClientError::UnexpectedReply("the requester's table was poisoned by a panic".into())
}

/// The reply consumer's ending, for every request still waiting (errors are not `Clone`).
fn copy_of(e: &ClientError) -> ClientError {
    match e {
        ClientError::ConsumerCancelled { tag, code, message } => ClientError::ConsumerCancelled {
            tag: tag.clone(),
            code: *code,
            message: message.clone(),
        },
        ClientError::Closed(reason) => ClientError::Closed(reason.clone()),
        other => ClientError::UnexpectedReply(format!("the reply consumer ended: {other}")),
    }
}
