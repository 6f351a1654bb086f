//! Messages: what an application publishes, and the limits the broker announced.
//!
//! Contract: a `Message` is owned, plain data (body + properties); it is turned into the wire's
//! `Message` flatbuffer exactly once, in the publishing task, by `weir_protocol::Encoder::message`
//! (one reusable encoder per thread), and those bytes travel unchanged to every consumer. Size
//! and header limits from `Welcome` are checked here so a message the broker would refuse is
//! refused locally, with a typed error, before anything is sent.

use std::cell::RefCell;

use bytes::Bytes;
use weir_protocol::{wire, Encoder, MessageProps, WireLimits};

use crate::error::{check_limit, ClientError};

/// The limits in force for a connection, as the broker announced them in `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, bytes after the length prefix.
    pub frame_size_max: u32,
    /// Largest encoded message (its flatbuffer bytes: body, properties and headers), bytes.
    pub message_size_max: u32,
    /// Most messages in one publish batch.
    pub publish_batch_max: u32,
    /// Most deliveries the broker puts in one `Deliver` frame.
    pub deliver_batch_max: u32,
    /// Most unconfirmed publishes per connection; `publish` waits beyond it.
    pub publishes_in_flight_max: u32,
    /// Largest prefetch a consumer may ask for.
    pub prefetch_max: u32,
    /// Longest name (queue, exchange, routing key, consumer tag), bytes.
    pub name_length_max: u32,
    /// Most headers in one message.
    pub headers_max: u32,
}

impl Limits {
    pub(crate) fn from_wire(l: &wire::LimitsT) -> Limits {
        Limits {
            frame_size_max: l.frame_size_max,
            message_size_max: l.message_size_max,
            publish_batch_max: l.publish_batch_max,
            deliver_batch_max: l.deliver_batch_max,
            publishes_in_flight_max: l.publishes_in_flight_max,
            prefetch_max: l.prefetch_max,
            name_length_max: l.name_length_max,
            headers_max: l.headers_max,
        }
    }

    /// The codec's limits for this connection. The verifier budgets are derived from the batch
    /// limits exactly as `WireLimits::check` requires, so a full batch always verifies.
    pub(crate) fn wire(&self) -> WireLimits {
        let d = WireLimits::DEFAULT;
        let batch = self.publish_batch_max.max(self.deliver_batch_max) as usize;
        WireLimits {
            frame_size_max: self.frame_size_max,
            message_size_max: self.message_size_max,
            publish_batch_max: self.publish_batch_max,
            deliver_batch_max: self.deliver_batch_max,
            verifier_tables_max: d.verifier_tables_max.max(4 * batch + 64),
            verifier_depth_max: d.verifier_depth_max,
            name_length_max: self.name_length_max,
            headers_max: self.headers_max,
        }
    }

    pub(crate) fn check_name(&self, what: &'static str, name: &str) -> Result<(), ClientError> {
        check_limit(what, name.len(), self.name_length_max)
    }
}

/// A message to publish: a body and optional properties, built with chained setters.
///
/// ```
/// let m = weir_client::Message::new("hello")
///     .content_type("text/plain")
///     .header("tenant", "acme");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    body: Bytes,
    message_id: Option<String>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    content_type: Option<String>,
    content_encoding: Option<String>,
    headers: Vec<(String, Bytes)>,
    timestamp_ms: i64,
    expiration_ms: Option<u32>,
    priority: u8,
    deliver_at_ms: Option<i64>,
    persistent: bool,
}

impl Message {
    /// A persistent message with no properties set (the schema's defaults).
    pub fn new(body: impl Into<Bytes>) -> Message {
        Message {
            body: body.into(),
            message_id: None,
            correlation_id: None,
            reply_to: None,
            content_type: None,
            content_encoding: None,
            headers: Vec::new(),
            timestamp_ms: 0,
            expiration_ms: None,
            priority: 0,
            deliver_at_ms: None,
            persistent: true,
        }
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// An application message id (opaque to the broker).
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// A correlation id, e.g. the request a reply answers (opaque to the broker).
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// The queue a reply should be published to (request-reply).
    pub fn reply_to(mut self, queue: impl Into<String>) -> Self {
        self.reply_to = Some(queue.into());
        self
    }

    /// The body's MIME type, e.g. `application/json`.
    pub fn content_type(mut self, mime: impl Into<String>) -> Self {
        self.content_type = Some(mime.into());
        self
    }

    /// The body's content encoding, e.g. `gzip`.
    pub fn content_encoding(mut self, encoding: impl Into<String>) -> Self {
        self.content_encoding = Some(encoding.into());
        self
    }

    /// Appends an application header; keys need not be unique, order is kept.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// When the producer created the message, ms since the Unix epoch.
    pub fn timestamp_ms(mut self, ms: i64) -> Self {
        self.timestamp_ms = ms;
        self
    }

    /// Per-message time to live, ms from when a queue accepts it.
    pub fn expiration_ms(mut self, ms: u32) -> Self {
        self.expiration_ms = Some(ms);
        self
    }

    /// 0 (lowest, the default) to 255; only priority queues order by it (see
    /// [`QueueArguments::priority_max`](crate::QueueArguments::priority_max)): higher first, in
    /// publish order within one priority, a priority above the queue's maximum counting as the
    /// maximum. Plain queues ignore it.
    ///
    /// ```no_run
    /// # async fn example(client: weir_client::Client) -> Result<(), weir_client::ClientError> {
    /// use weir_client::Message;
    /// client.publish("jobs", Message::new("resize avatar")).await?.await?; // priority 0
    /// client.publish("jobs", Message::new("reset password").priority(9)).await?.await?;
    /// // A consumer of a priority queue `jobs` now gets "reset password" first.
    /// # Ok(())
    /// # }
    /// ```
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Not delivered before this time, ms since the Unix epoch (a delayed message; the broker
    /// refuses one more than its `delay_ms_max` ahead). Its time to live counts from then.
    pub fn deliver_at_ms(mut self, ms: i64) -> Self {
        self.deliver_at_ms = Some(ms);
        self
    }

    /// Non-persistent messages are kept in memory only, even on a durable queue.
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// The wire bytes of this message, checked against the connection's limits.
    pub(crate) fn encode(&self, limits: &Limits) -> Result<Bytes, ClientError> {
        check_limit("headers", self.headers.len(), limits.headers_max)?;
        let headers: Vec<(&str, &[u8])> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        let props = MessageProps {
            message_id: self.message_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            reply_to: self.reply_to.as_deref(),
            content_type: self.content_type.as_deref(),
            content_encoding: self.content_encoding.as_deref(),
            headers: &headers,
            timestamp_ms: self.timestamp_ms,
            expiration_ms: self.expiration_ms,
            priority: self.priority,
            deliver_at_ms: self.deliver_at_ms,
            persistent: self.persistent,
        };
        let bytes = MESSAGE_ENCODER.with(|e| e.borrow_mut().message(&props, &self.body))?;
        check_limit("message_size_max", bytes.len(), limits.message_size_max)?;
        Ok(bytes)
    }
}

impl From<&str> for Message {
    fn from(body: &str) -> Message {
        Message::new(Bytes::copy_from_slice(body.as_bytes()))
    }
}

impl From<Vec<u8>> for Message {
    fn from(body: Vec<u8>) -> Message {
        Message::new(body)
    }
}

thread_local! {
    // One builder per thread, reused across messages: encoding allocates only the result. Its
    // own limits are wide open because the connection's limits (which differ per broker) are
    // checked by `encode` with typed errors; the protocol crate's error would be untyped here.
    static MESSAGE_ENCODER: RefCell<Encoder> = RefCell::new(Encoder::new(WireLimits {
        message_size_max: i32::MAX as u32,
        headers_max: u32::MAX,
        ..WireLimits::DEFAULT
    }));
}
