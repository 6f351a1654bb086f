//! Frame decoding: bytes as they arrive -> verified frames backed by `Bytes`.
//!
//! Contract: no I/O and no runtime. Any thread may own a `FrameDecoder`; it holds only limits.
//! The caller reads from its socket into a `BytesMut` and calls `decode` until it returns
//! `Ok(None)` ("need more bytes"). Each `InFrame` owns a reference-counted slice of the read
//! buffer: nothing is copied, and a message's bytes can be handed on as `Bytes` (`message_bytes`).
//!
//! Faults handled: any byte sequence. A length prefix over `frame_size_max` is refused before
//! the buffer grows for it; every frame is checked by the flatbuffers verifier under tight
//! limits, and so is every message nested in it (the verifier does not descend into
//! `nested_flatbuffer` fields by itself, see ARCHITECTURE.md); batch counts, message sizes and
//! name lengths are checked against `WireLimits`. Every failure is a `ProtocolError`; none panics.

use bytes::{Bytes, BytesMut};
use flatbuffers::{InvalidFlatbuffer, Vector};

use crate::limits::{WireLimits, FRAME_PREFIX_BYTES};
use crate::wire::{self, Body};
use crate::ProtocolError;

/// A frame that passed verification. Cheap to clone (one reference count).
#[derive(Clone)]
pub struct InFrame {
    /// The whole frame: length prefix and flatbuffer. The prefix stays because the encoder
    /// aligns the buffer counting it: without it, 8-byte fields sit 4 bytes off their alignment
    /// and the verifier (which checks alignment relative to the slice) refuses them.
    bytes: Bytes,
}

impl InFrame {
    /// The frame, read in place.
    pub fn frame(&self) -> wire::Frame<'_> {
        // SAFETY: `bytes` passed `size_prefixed_root_with_opts::<Frame>` in `FrameDecoder::decode`
        // (`InFrame::verify` goes through it too), and `Bytes` is immutable, so the unchecked
        // read sees exactly the verified buffer.
        unsafe { flatbuffers::size_prefixed_root_unchecked::<wire::Frame>(&self.bytes) }
    }

    pub fn request_id(&self) -> u64 {
        self.frame().request_id()
    }

    pub fn body_type(&self) -> Body {
        self.frame().body_type()
    }

    /// The frame's bytes, length prefix included: forwardable as they are.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// A zero-copy handle on a nested message's bytes: the same memory the frame was read into.
    ///
    /// Panics if `message` is not a vector of this frame (a caller bug, not an input fault).
    pub fn message_bytes(&self, message: Vector<'_, u8>) -> Bytes {
        self.bytes.slice_ref(message.bytes())
    }

    /// The entries of a `Publish` frame, each with its message as `Bytes`; empty for other bodies.
    pub fn publish_entries(&self) -> impl Iterator<Item = (wire::PublishEntry<'_>, Bytes)> + '_ {
        let entries = self.frame().body_as_publish().map(|p| p.entries());
        entries.into_iter().flatten().map(move |e| {
            let message = self.message_bytes(e.message());
            (e, message)
        })
    }

    /// The deliveries of a `Deliver` frame, each with its message as `Bytes`; empty otherwise.
    pub fn deliveries(&self) -> impl Iterator<Item = (wire::Delivery<'_>, Bytes)> + '_ {
        let deliveries = self.frame().body_as_deliver().map(|d| d.deliveries());
        deliveries.into_iter().flatten().map(move |d| {
            let message = self.message_bytes(d.message());
            (d, message)
        })
    }

    /// Verifies one whole frame (length prefix included) that did not come through a decoder,
    /// under the same rules as `FrameDecoder::decode`.
    pub fn verify(bytes: Bytes, limits: &WireLimits) -> Result<InFrame, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        let whole = buf.len();
        match FrameDecoder::new(*limits).decode(&mut buf)? {
            Some(frame) if buf.is_empty() => Ok(frame),
            _ => Err(ProtocolError::Invalid(format!(
                "{whole} bytes are not exactly one frame ({} left over)",
                buf.len()
            ))),
        }
    }
}

impl std::fmt::Debug for InFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFrame")
            .field("len", &self.bytes.len())
            .field("frame", &self.frame())
            .finish()
    }
}

/// Splits a byte stream into verified frames.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    limits: WireLimits,
}

impl FrameDecoder {
    pub fn new(limits: WireLimits) -> Self {
        FrameDecoder { limits }
    }

    pub fn limits(&self) -> &WireLimits {
        &self.limits
    }

    /// Takes the next frame off the front of `buf`.
    ///
    /// `Ok(None)`: `buf` holds no complete frame yet; nothing was consumed, and `buf` has been
    /// given capacity for the announced frame (bounded by `frame_size_max`). `Ok(Some)`: one frame
    /// was consumed. `Err`: if `is_fatal()`, the stream is broken and the connection must close;
    /// otherwise the offending frame was consumed whole and decoding can go on.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<InFrame>, ProtocolError> {
        if buf.len() < FRAME_PREFIX_BYTES {
            return Ok(None);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if len > self.limits.frame_size_max {
            return Err(ProtocolError::FrameTooLarge {
                len: u64::from(len),
                max: self.limits.frame_size_max,
            });
        }
        let total = FRAME_PREFIX_BYTES + len as usize;
        if buf.len() < total {
            // Safe to reserve: `len` was checked against the limit above.
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let bytes = buf.split_to(total).freeze();
        let root = flatbuffers::size_prefixed_root_with_opts::<wire::Frame>(
            &self.limits.frame_verifier(),
            &bytes,
        )
        .map_err(ProtocolError::Malformed)?;
        check_body(root, &self.limits)?;
        Ok(Some(InFrame { bytes }))
    }
}

/// The checks the verifier cannot make: a known body, batch sizes, nested messages, name lengths.
fn check_body(frame: wire::Frame<'_>, limits: &WireLimits) -> Result<(), ProtocolError> {
    let body = frame.body_type();
    if body == Body::NONE {
        return Err(ProtocolError::Invalid("frame has no body".into()));
    }
    if body.variant_name().is_none() {
        return Err(ProtocolError::UnsupportedBody(body.0));
    }
    let name = |field: &'static str, value: Option<&str>| check_name(field, value, limits);

    if let Some(p) = frame.body_as_publish() {
        let entries = p.entries();
        check_batch("publish", entries.len(), limits.publish_batch_max)?;
        for (index, e) in entries.iter().enumerate() {
            name("exchange", e.exchange())?;
            name("routing_key", e.routing_key())?;
            check_message(index, e.message(), limits)?;
        }
    } else if let Some(d) = frame.body_as_deliver() {
        name("consumer_tag", d.consumer_tag())?;
        let deliveries = d.deliveries();
        check_batch("deliver", deliveries.len(), limits.deliver_batch_max)?;
        for (index, d) in deliveries.iter().enumerate() {
            check_message(index, d.message(), limits)?;
        }
    } else if let Some(r) = frame.body_as_return() {
        let entries = r.entries();
        check_batch("return", entries.len(), limits.publish_batch_max)?;
        for (index, e) in entries.iter().enumerate() {
            if let Some(m) = e.message() {
                check_message(index, m, limits)?;
            }
        }
    } else if let Some(g) = frame.body_as_get_ok() {
        if let Some(d) = g.delivery() {
            check_message(0, d.message(), limits)?;
        }
    } else if let Some(q) = frame.body_as_declare_queue() {
        name("name", q.name())?;
        if let Some(a) = q.arguments() {
            name("dead_letter_exchange", a.dead_letter_exchange())?;
            name("dead_letter_routing_key", a.dead_letter_routing_key())?;
        }
    } else if let Some(q) = frame.body_as_delete_queue() {
        name("name", Some(q.name()))?;
    } else if let Some(q) = frame.body_as_purge_queue() {
        name("name", Some(q.name()))?;
    } else if let Some(q) = frame.body_as_get_queue_info() {
        name("name", Some(q.name()))?;
    } else if let Some(x) = frame.body_as_declare_exchange() {
        name("name", Some(x.name()))?;
    } else if let Some(x) = frame.body_as_delete_exchange() {
        name("name", Some(x.name()))?;
    } else if let Some(b) = frame.body_as_bind() {
        name("exchange", Some(b.exchange()))?;
        name("queue", Some(b.queue()))?;
        name("binding_key", b.binding_key())?;
    } else if let Some(b) = frame.body_as_unbind() {
        name("exchange", Some(b.exchange()))?;
        name("queue", Some(b.queue()))?;
        name("binding_key", b.binding_key())?;
    } else if let Some(c) = frame.body_as_consume() {
        name("queue", Some(c.queue()))?;
        name("consumer_tag", c.consumer_tag())?;
    } else if let Some(g) = frame.body_as_get() {
        name("queue", Some(g.queue()))?;
    } else if let Some(a) = frame.body_as_ack() {
        check_ranges("ack", a.ranges())?;
    } else if let Some(n) = frame.body_as_nack() {
        check_ranges("nack", n.ranges())?;
    } else if let Some(c) = frame.body_as_confirm() {
        check_ranges("confirm", c.ranges())?;
    }
    Ok(())
}

fn check_batch(what: &'static str, count: usize, max: u32) -> Result<(), ProtocolError> {
    if count > max as usize {
        return Err(ProtocolError::BatchTooLarge { what, count, max });
    }
    if count == 0 {
        return Err(ProtocolError::Invalid(format!("{what} batch is empty")));
    }
    Ok(())
}

fn check_name(
    field: &'static str,
    value: Option<&str>,
    limits: &WireLimits,
) -> Result<(), ProtocolError> {
    match value {
        Some(v) if v.len() > limits.name_length_max as usize => {
            Err(ProtocolError::Invalid(format!(
                "{field} of {} bytes exceeds name_length_max {}",
                v.len(),
                limits.name_length_max
            )))
        }
        _ => Ok(()),
    }
}

fn check_ranges(what: &'static str, ranges: Vector<'_, wire::Range>) -> Result<(), ProtocolError> {
    for r in ranges.iter() {
        if r.first() > r.last() {
            return Err(ProtocolError::Invalid(format!(
                "{what} range {}..={} is reversed",
                r.first(),
                r.last()
            )));
        }
    }
    Ok(())
}

fn check_message(
    index: usize,
    message: Vector<'_, u8>,
    limits: &WireLimits,
) -> Result<(), ProtocolError> {
    let bytes = message.bytes();
    if bytes.len() > limits.message_size_max as usize {
        return Err(ProtocolError::MessageTooLarge {
            index,
            len: bytes.len(),
            max: limits.message_size_max,
        });
    }
    verify_message(bytes, limits)
        .map(|_| ())
        .map_err(|error| ProtocolError::MalformedMessage { index, error })
}

/// Verifies untrusted bytes as a `Message` (for example one a client built, or a test's).
pub fn verify_message<'b>(
    bytes: &'b [u8],
    limits: &WireLimits,
) -> Result<wire::Message<'b>, InvalidFlatbuffer> {
    flatbuffers::root_with_opts::<wire::Message>(&limits.message_verifier(), bytes)
}

/// Reads a message that was verified before: bytes from an `InFrame`, or from the journal after
/// their record's CRC matched (the journal only ever stores verified messages).
///
/// # Safety
/// `bytes` must be exactly the bytes of a `Message` that passed `verify_message` (or the decoder).
pub unsafe fn message_unchecked(bytes: &[u8]) -> wire::Message<'_> {
    // SAFETY: the caller guarantees `bytes` was verified as a `Message`.
    unsafe { flatbuffers::root_unchecked::<wire::Message>(bytes) }
}
