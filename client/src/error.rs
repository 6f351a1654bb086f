//! The client's one error enum.
//!
//! Contract: every fallible call of this crate returns `ClientError`. Broker refusals keep the
//! schema's `ErrorCode` and the broker's sentence untouched, so callers match on the code and show
//! the sentence. Errors that many waiters share (a connection that died fails every pending
//! request on it) are built from `CloseReason`, which is `Clone`; `std::io::Error` is not, which
//! is why a dead connection's I/O error travels as its kind and text.

use std::fmt;

use bytes::Bytes;
use weir_protocol::wire::ErrorCode;
use weir_protocol::ProtocolError;

/// Why a connection ended. Every request, publish and consumer pending on it fails with
/// `ClientError::Closed` carrying this.
#[derive(Debug, Clone, PartialEq)]
pub enum CloseReason {
    /// This client closed it (`Client::close`, or the `Client` was dropped).
    Local,
    /// The broker closed the socket without an `Error` frame first.
    Eof,
    /// Reading or writing the socket failed.
    Io {
        /// The I/O error's kind.
        kind: std::io::ErrorKind,
        /// The I/O error's text.
        message: String,
    },
    /// The broker sent an `Error` frame with `close = true` (protocol violation, shutdown, a
    /// connection limit), then closed.
    Broker {
        /// Why the broker closed the connection.
        code: ErrorCode,
        /// The broker's sentence.
        message: String,
    },
    /// The broker sent bytes this client cannot decode; the stream cannot be trusted any more.
    Protocol(ProtocolError),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Local => write!(f, "closed by this client"),
            CloseReason::Eof => write!(f, "the broker closed the connection"),
            CloseReason::Io { kind, message } => write!(f, "I/O error ({kind:?}): {message}"),
            CloseReason::Broker { code, message } => {
                write!(f, "closed by the broker ({code:?}): {message}")
            }
            CloseReason::Protocol(e) => write!(f, "the broker sent a bad frame: {e}"),
        }
    }
}

/// A mandatory message that routed to no queue, as the broker sent it back.
#[derive(Debug, Clone)]
pub struct ReturnedMessage {
    /// Why it came back (`NoRoute`).
    pub code: ErrorCode,
    /// The exchange it was published to.
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The `Message` flatbuffer exactly as published (verified by the decoder).
    pub message: Bytes,
}

/// Everything that can go wrong in this crate: one enum, matched on by kind, with the broker's
/// `ErrorCode` and sentence kept intact for refusals (see [`ClientError::code`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed (the only place a raw socket error surfaces; later ones close the
    /// connection and surface as `Closed`).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// A frame could not be encoded (a local fault: nothing was sent).
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),

    /// The broker does not speak this client's protocol version; its sentence says which it does.
    #[error("protocol version refused by the broker: {message}")]
    ProtocolVersion {
        /// The broker's sentence (or this client's, if the broker answered another version).
        message: String,
    },

    /// The broker refused a request or a publish; the connection goes on.
    #[error("refused by the broker ({code:?}): {message}")]
    Refused {
        /// Why, as the schema's error code.
        code: ErrorCode,
        /// The broker's sentence.
        message: String,
    },

    /// The connection is gone; pending requests, publishes and consumers on it fail with this.
    #[error("connection closed: {0}")]
    Closed(CloseReason),

    /// A mandatory publish routed to no queue and came back.
    #[error("message returned by the broker ({:?}): exchange '{}', routing key '{}'", .0.code, .0.exchange, .0.routing_key)]
    Returned(Box<ReturnedMessage>),

    /// The request would break a limit the broker announced in `Welcome`; nothing was sent.
    #[error("{what} {value} exceeds the broker's limit {max}")]
    LimitExceeded {
        /// Which limit, e.g. "publish batch size".
        what: &'static str,
        /// What the request asked for.
        value: u64,
        /// The broker's limit.
        max: u64,
    },

    /// The broker cancelled this consumer (its queue was deleted, or the broker is stopping).
    #[error("consumer '{tag}' cancelled by the broker ({code:?}): {message}")]
    ConsumerCancelled {
        /// The cancelled consumer's tag.
        tag: String,
        /// Why, as the schema's error code.
        code: ErrorCode,
        /// The broker's sentence.
        message: String,
    },

    /// An argument this client refuses before sending anything.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// No answer came in time (a request-reply's reply); nothing was withdrawn.
    #[error("no {what} within {after:?}")]
    Timeout {
        /// What did not come, e.g. "reply".
        what: &'static str,
        /// How long it was waited for.
        after: std::time::Duration,
    },

    /// The broker answered with a frame that is not a reply to what was asked (a broker bug).
    #[error("unexpected reply: {0}")]
    UnexpectedReply(String),
}

impl ClientError {
    /// The broker's error code, for refusals and broker-initiated closes.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. }
            | ClientError::ConsumerCancelled { code, .. }
            | ClientError::Closed(CloseReason::Broker { code, .. }) => Some(*code),
            ClientError::Returned(r) => Some(r.code),
            ClientError::ProtocolVersion { .. } => Some(ErrorCode::ProtocolVersion),
            _ => None,
        }
    }
}

/// Checks a count or size against a limit from `Welcome`.
pub(crate) fn check_limit(what: &'static str, value: usize, max: u32) -> Result<(), ClientError> {
    if value as u64 > u64::from(max) {
        return Err(ClientError::LimitExceeded {
            what,
            value: value as u64,
            max: u64::from(max),
        });
    }
    Ok(())
}
