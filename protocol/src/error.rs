//! The protocol layer's one error enum.
//!
//! Every malformed input maps to a variant here, never to a panic. `is_fatal` tells the
//! connection layer whether the byte stream can still be trusted: after a fatal error the frame
//! boundaries are lost or the peer is broken, so the connection is closed (after an `Error`
//! frame carrying `code()`); after a non-fatal one the frame was consumed whole and the
//! connection goes on.

use crate::wire::ErrorCode;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// The length prefix announces more than `frame_size_max`: refused before allocating.
    #[error("frame of {len} bytes exceeds frame_size_max {max}")]
    FrameTooLarge { len: u64, max: u32 },

    /// The frame's bytes are not a valid `Frame` flatbuffer within the verifier's limits.
    #[error("malformed frame: {0}")]
    Malformed(flatbuffers::InvalidFlatbuffer),

    /// A message nested in a frame is not a valid `Message` flatbuffer.
    #[error("malformed message at entry {index}: {error}")]
    MalformedMessage {
        index: usize,
        error: flatbuffers::InvalidFlatbuffer,
    },

    /// The frame is well-formed but breaks a protocol rule the verifier cannot see.
    #[error("invalid frame: {0}")]
    Invalid(String),

    /// The frame is well-formed but its body type is not one this build knows (a newer peer).
    /// The frame was consumed whole; the connection can go on.
    #[error("unsupported frame body type {0}")]
    UnsupportedBody(u8),

    /// A batch carries more entries than its limit.
    #[error("{what} of {count} entries exceeds its limit {max}")]
    BatchTooLarge {
        what: &'static str,
        count: usize,
        max: u32,
    },

    /// A nested message exceeds `message_size_max`.
    #[error("message at entry {index} of {len} bytes exceeds message_size_max {max}")]
    MessageTooLarge { index: usize, len: usize, max: u32 },

    /// An encoder was asked to produce a frame larger than `frame_size_max`; nothing was written.
    #[error("encoded frame of {len} bytes would exceed frame_size_max {max}")]
    EncodeTooLarge { len: usize, max: u32 },

    /// A set of limits breaks one of the relations `WireLimits::check` asserts.
    #[error("limit {limit}: {reason}")]
    Limits { limit: &'static str, reason: String },
}

impl ProtocolError {
    /// True when the connection must be closed: the stream is no longer trustworthy.
    pub fn is_fatal(&self) -> bool {
        match self {
            ProtocolError::FrameTooLarge { .. }
            | ProtocolError::Malformed(_)
            | ProtocolError::MalformedMessage { .. }
            | ProtocolError::Invalid(_)
            | ProtocolError::BatchTooLarge { .. }
            // The peer was told `message_size_max` in `Welcome`; exceeding it is a broken peer.
            | ProtocolError::MessageTooLarge { .. } => true,
            // The frame was consumed whole and nothing of it was acted on; the broker answers with
            // an error and goes on.
            ProtocolError::UnsupportedBody(_) => false,
            // Local errors: no peer input is involved.
            ProtocolError::EncodeTooLarge { .. } | ProtocolError::Limits { .. } => false,
        }
    }

    /// The code an `Error` frame reporting this failure carries.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtocolError::Malformed(_)
            | ProtocolError::MalformedMessage { .. }
            | ProtocolError::Invalid(_) => ErrorCode::MalformedFrame,
            ProtocolError::UnsupportedBody(_) => ErrorCode::UnsupportedFrame,
            ProtocolError::BatchTooLarge { .. } => ErrorCode::LimitExceeded,
            ProtocolError::MessageTooLarge { .. } => ErrorCode::MessageTooLarge,
            ProtocolError::EncodeTooLarge { .. } | ProtocolError::Limits { .. } => {
                ErrorCode::Internal
            }
        }
    }
}
