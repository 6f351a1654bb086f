//! Frame encoding: one reusable builder per connection (or shard), frames appended to an output
//! buffer so that many frames leave in one socket write.
//!
//! Contract: no I/O and no runtime. An `Encoder` is owned by one task; it keeps one
//! `FlatBufferBuilder` whose buffer is reused across frames (it grows to the largest frame
//! encoded through it, at most `frame_size_max`). Every method either appends exactly one whole
//! length-prefixed frame to `out` or appends nothing and returns an error.
//!
//! Two paths:
//! - `encode(&FrameT)`: any frame, through the generated object API. Control frames are rare
//!   and small; their owned strings cost nothing that matters.
//! - `publish`, `confirm`, `ack`, `nack`, `message`: the data path, from borrowed slices, with
//!   no allocation beyond the builder's reused buffer. A published message's bytes are copied
//!   once into the builder and once into `out`.
//! - `deliver`, `deliver_prefix`: the broker's hot path, without the builder. The frame is laid
//!   out front to back and written straight into `out` (`deliver.rs`), so a delivered message's
//!   bytes are copied once, from the stored message into the outbox (see ARCHITECTURE.md, "the
//!   delivery path: every copy and hop"). `deliver` gathers its items into a reused list first
//!   (the layout needs their count); `deliver_prefix` writes from the caller's slice.

use bytes::{Bytes, BytesMut};
use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};

use crate::limits::{deliver_frame_bytes_max, delivery_bytes_max, WireLimits, FRAME_PREFIX_BYTES};
use crate::wire::{self, Body, Durability, FrameT, Range};
use crate::ProtocolError;

mod deliver;

/// One message of a `Publish` batch, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct PublishItem<'a> {
    pub sequence: u64,
    /// Empty: the default exchange.
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub mandatory: bool,
    /// A `Message` flatbuffer (from `Encoder::message`, or bytes received earlier).
    pub message: &'a [u8],
}

/// One delivery of a `Deliver` batch, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryItem<'a> {
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub delivery_count: u32,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub message: &'a [u8],
}

/// The properties of a message to build, borrowed. `Default` is a persistent message with no
/// properties set.
#[derive(Debug, Clone, Copy)]
pub struct MessageProps<'a> {
    pub message_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    pub headers: &'a [(&'a str, &'a [u8])],
    pub timestamp_ms: i64,
    pub expiration_ms: Option<u32>,
    pub priority: u8,
    pub deliver_at_ms: Option<i64>,
    pub persistent: bool,
}

impl Default for MessageProps<'_> {
    fn default() -> Self {
        MessageProps {
            message_id: None,
            correlation_id: None,
            reply_to: None,
            content_type: None,
            content_encoding: None,
            headers: &[],
            timestamp_ms: 0,
            expiration_ms: None,
            priority: 0,
            deliver_at_ms: None,
            persistent: true,
        }
    }
}

pub struct Encoder {
    fbb: FlatBufferBuilder<'static>,
    limits: WireLimits,
    // Scratch lists of child offsets, kept to reuse their allocation.
    publish_entries: Vec<WIPOffset<wire::PublishEntry<'static>>>,
    /// Emptied after each use; see `relabel`.
    delivery_items: Vec<DeliveryItem<'static>>,
    headers: Vec<WIPOffset<wire::Header<'static>>>,
}

impl Encoder {
    pub fn new(limits: WireLimits) -> Self {
        Encoder {
            fbb: FlatBufferBuilder::with_capacity(4096),
            limits,
            publish_entries: Vec::new(),
            delivery_items: Vec::new(),
            headers: Vec::new(),
        }
    }

    pub fn limits(&self) -> &WireLimits {
        &self.limits
    }

    /// Appends any frame, built from the object API.
    pub fn encode(&mut self, frame: &FrameT, out: &mut BytesMut) -> Result<usize, ProtocolError> {
        // `body` is required: flatbuffers' builder panics when finishing a frame without it.
        if frame.body.body_type() == Body::NONE {
            return Err(ProtocolError::Invalid("frame has no body".into()));
        }
        self.fbb.reset();
        let root = frame.pack(&mut self.fbb);
        self.fbb.finish_size_prefixed(root, None);
        self.emit(out)
    }

    /// Appends a `Publish` of `items`. Refuses more than `publish_batch_max` items, an empty
    /// batch, and any message over `message_size_max`, as the receiving decoder would.
    pub fn publish<'a>(
        &mut self,
        out: &mut BytesMut,
        request_id: u64,
        producer_id: Option<u64>,
        confirm: bool,
        items: impl IntoIterator<Item = PublishItem<'a>>,
    ) -> Result<usize, ProtocolError> {
        self.fbb.reset();
        let mut entries = std::mem::take(&mut self.publish_entries);
        entries.clear();
        for (index, item) in items.into_iter().enumerate() {
            if index as u32 >= self.limits.publish_batch_max {
                self.publish_entries = entries;
                return Err(ProtocolError::BatchTooLarge {
                    what: "publish",
                    count: index + 1,
                    max: self.limits.publish_batch_max,
                });
            }
            if let Err(e) = self.check_message_size(index, item.message) {
                self.publish_entries = entries;
                return Err(e);
            }
            let message = Some(self.fbb.create_vector(item.message));
            let exchange = self.optional_string(item.exchange);
            let routing_key = self.optional_string(item.routing_key);
            entries.push(wire::PublishEntry::create(
                &mut self.fbb,
                &wire::PublishEntryArgs {
                    sequence: item.sequence,
                    exchange,
                    routing_key,
                    mandatory: item.mandatory,
                    message,
                },
            ));
        }
        if entries.is_empty() {
            self.publish_entries = entries;
            return Err(ProtocolError::Invalid("publish batch is empty".into()));
        }
        let entries_vec = Some(self.fbb.create_vector(&entries));
        self.publish_entries = entries;
        let body = wire::Publish::create(
            &mut self.fbb,
            &wire::PublishArgs {
                producer_id,
                confirm,
                entries: entries_vec,
            },
        );
        self.finish(request_id, Body::Publish, body.as_union_value(), out)
    }

    /// Appends a `Deliver` of `items` to the consumer `consumer_tag`, all in one frame: refused
    /// if they do not fit it. A batch of any size goes out with `deliver_prefix`.
    pub fn deliver<'a>(
        &mut self,
        out: &mut BytesMut,
        consumer_tag: &str,
        items: impl IntoIterator<Item = DeliveryItem<'a>>,
    ) -> Result<usize, ProtocolError> {
        // The frame is laid out before it is written, so the items are gathered first; one more
        // than the batch limit is enough to refuse an oversized batch as the builder path did.
        let mut gathered = relabel(std::mem::take(&mut self.delivery_items));
        gathered.extend(
            items
                .into_iter()
                .take(self.limits.deliver_batch_max as usize + 1),
        );
        let result = deliver::deliver(&self.limits, out, consumer_tag, &gathered);
        self.delivery_items = relabel(gathered);
        result
    }

    /// Appends one `Deliver` frame holding the longest prefix of `items` that fits it: at most
    /// `deliver_batch_max` deliveries whose bound (`limits::delivery_bytes_max`) keeps the frame
    /// within `frame_size_max`, and always at least the first. Returns how many it encoded, so a
    /// batch of any size leaves, in order, by calling this until every item is out. Fails,
    /// appending nothing, only when the first delivery cannot be encoded even alone (a message
    /// over `message_size_max`, or names too long for a frame): what becomes of it is the
    /// caller's choice.
    pub fn deliver_prefix(
        &mut self,
        out: &mut BytesMut,
        consumer_tag: &str,
        items: &[DeliveryItem<'_>],
    ) -> Result<usize, ProtocolError> {
        let budget = self.limits.frame_size_max as usize;
        let mut bytes = deliver_frame_bytes_max(consumer_tag.len());
        let mut count = 0;
        for item in items.iter().take(self.limits.deliver_batch_max as usize) {
            bytes += delivery_bytes_max(
                item.message.len(),
                item.exchange.len(),
                item.routing_key.len(),
            );
            if count > 0 && bytes > budget {
                break;
            }
            count += 1;
        }
        deliver::deliver(&self.limits, out, consumer_tag, &items[..count])?;
        Ok(count)
    }

    /// Appends a `Confirm` push.
    pub fn confirm(
        &mut self,
        out: &mut BytesMut,
        ranges: &[Range],
        durability: Durability,
        duplicates: &[Range],
    ) -> Result<usize, ProtocolError> {
        self.fbb.reset();
        let ranges = Some(self.fbb.create_vector(ranges));
        let duplicates = (!duplicates.is_empty()).then(|| self.fbb.create_vector(duplicates));
        let body = wire::Confirm::create(
            &mut self.fbb,
            &wire::ConfirmArgs {
                ranges,
                durability,
                duplicates,
            },
        );
        self.finish(0, Body::Confirm, body.as_union_value(), out)
    }

    /// Appends an `Ack`. A non-zero `request_id` asks for an `Ok` once the acks are durable.
    pub fn ack(
        &mut self,
        out: &mut BytesMut,
        request_id: u64,
        ranges: &[Range],
    ) -> Result<usize, ProtocolError> {
        self.fbb.reset();
        let ranges = Some(self.fbb.create_vector(ranges));
        let body = wire::Ack::create(&mut self.fbb, &wire::AckArgs { ranges });
        self.finish(request_id, Body::Ack, body.as_union_value(), out)
    }

    /// Appends a `Nack`.
    pub fn nack(
        &mut self,
        out: &mut BytesMut,
        request_id: u64,
        ranges: &[Range],
        requeue: bool,
    ) -> Result<usize, ProtocolError> {
        self.fbb.reset();
        let ranges = Some(self.fbb.create_vector(ranges));
        let body = wire::Nack::create(&mut self.fbb, &wire::NackArgs {
                ranges,
                requeue,
                delay_ms: None,
            });
        self.finish(request_id, Body::Nack, body.as_union_value(), out)
    }

    /// Builds a `Message` flatbuffer: the bytes a `PublishItem` carries.
    pub fn message(
        &mut self,
        props: &MessageProps<'_>,
        body: &[u8],
    ) -> Result<Bytes, ProtocolError> {
        if props.headers.len() > self.limits.headers_max as usize {
            return Err(ProtocolError::Invalid(format!(
                "{} headers exceed headers_max {}",
                props.headers.len(),
                self.limits.headers_max
            )));
        }
        self.fbb.reset();
        let body = Some(self.fbb.create_vector(body));
        let mut headers = std::mem::take(&mut self.headers);
        headers.clear();
        for (key, value) in props.headers {
            let key = Some(self.fbb.create_string(key));
            let value = Some(self.fbb.create_vector(value));
            headers.push(wire::Header::create(
                &mut self.fbb,
                &wire::HeaderArgs { key, value },
            ));
        }
        let headers_vec = (!headers.is_empty()).then(|| self.fbb.create_vector(&headers));
        self.headers = headers;
        let s =
            |fbb: &mut FlatBufferBuilder<'static>, v: Option<&str>| v.map(|v| fbb.create_string(v));
        let args = wire::MessageArgs {
            message_id: s(&mut self.fbb, props.message_id),
            correlation_id: s(&mut self.fbb, props.correlation_id),
            reply_to: s(&mut self.fbb, props.reply_to),
            content_type: s(&mut self.fbb, props.content_type),
            content_encoding: s(&mut self.fbb, props.content_encoding),
            headers: headers_vec,
            timestamp_ms: props.timestamp_ms,
            expiration_ms: props.expiration_ms,
            priority: props.priority,
            deliver_at_ms: props.deliver_at_ms,
            persistent: props.persistent,
            body,
        };
        let root = wire::Message::create(&mut self.fbb, &args);
        self.fbb.finish(root, None);
        let data = self.fbb.finished_data();
        self.check_message_size(0, data)?;
        Ok(Bytes::copy_from_slice(data))
    }

    fn optional_string(&mut self, s: &str) -> Option<WIPOffset<&'static str>> {
        // Absent and empty read the same (`unwrap_or("")`); absent costs no bytes.
        (!s.is_empty()).then(|| self.fbb.create_string(s))
    }

    fn check_message_size(&self, index: usize, message: &[u8]) -> Result<(), ProtocolError> {
        check_message_size(&self.limits, index, message)
    }

    fn finish(
        &mut self,
        request_id: u64,
        body_type: Body,
        body: WIPOffset<UnionWIPOffset>,
        out: &mut BytesMut,
    ) -> Result<usize, ProtocolError> {
        let frame = wire::Frame::create(
            &mut self.fbb,
            &wire::FrameArgs {
                request_id,
                body_type,
                body: Some(body),
            },
        );
        self.fbb.finish_size_prefixed(frame, None);
        self.emit(out)
    }

    /// Copies the finished frame to `out` if it is within `frame_size_max`.
    fn emit(&mut self, out: &mut BytesMut) -> Result<usize, ProtocolError> {
        let data = self.fbb.finished_data();
        let len = data.len() - FRAME_PREFIX_BYTES;
        if len > self.limits.frame_size_max as usize {
            return Err(ProtocolError::EncodeTooLarge {
                len,
                max: self.limits.frame_size_max,
            });
        }
        out.extend_from_slice(data);
        Ok(data.len())
    }
}

fn check_message_size(
    limits: &WireLimits,
    index: usize,
    message: &[u8],
) -> Result<(), ProtocolError> {
    if message.len() > limits.message_size_max as usize {
        return Err(ProtocolError::MessageTooLarge {
            index,
            len: message.len(),
            max: limits.message_size_max,
        });
    }
    Ok(())
}

/// An emptied list of borrowed items under another lifetime, keeping its allocation: the
/// encoder's scratch list outlives every call's borrows. Collecting a `vec::IntoIter` into a
/// `Vec` of a type of the same layout reuses the allocation (std's in-place collection); were it
/// not to, this would only allocate, never be unsound.
fn relabel<'b>(mut items: Vec<DeliveryItem<'_>>) -> Vec<DeliveryItem<'b>> {
    items.clear();
    items
        .into_iter()
        .map(|_| unreachable!("the list was emptied"))
        .collect()
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("limits", &self.limits)
            .finish()
    }
}
