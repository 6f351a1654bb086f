//! `Deliver` frames written front to back straight into the outbox: a message's bytes are copied
//! once, from the stored message into `out`, with no builder in between.
//!
//! Contract: the bytes are a valid size-prefixed `Frame { request_id: 0, body: Deliver }` that
//! the flatbuffers verifier accepts and reads exactly as the builder's would (the tests check
//! both against the builder-based reference encoder); refusals are the builder path's, checked
//! before a byte is written, so `out` gains one whole frame or nothing.
//!
//! Why a front-to-back layout is a flatbuffer: a uoffset points to a higher address (it is
//! unsigned and added), and a table's soffset to its vtable may point either way. So every
//! referrer comes before what it refers to: the root offset, then each table after its vtable,
//! then what the table points to:
//!
//! ```text
//! size prefix, root -> Frame vtable, Frame -> Deliver vtable, Deliver -> consumer tag string,
//! deliveries vector (n offsets) -> per delivery: pad, [vtable], Delivery table, exchange,
//! routing key, pad, message vector (length + the message's bytes); pad the frame to 8
//! ```
//!
//! A Delivery vtable is written by the first delivery of its shape (which fields are present,
//! and the table's phase: `DeliveryShape`) and shared by the later ones, as the builder shares
//! identical vtables. Positions are computed before anything is written (`Walk`), so every
//! offset is known when its slot is written and nothing is patched afterwards. Field slots come
//! from the generated code's `VT_*` constants: a schema change that moves or drops a field
//! breaks the build, not the wire. Alignment is relative to the frame's first byte (its length
//! prefix), as the verifier checks it (`InFrame` keeps the prefix for that reason).
//!
//! Defaults: `delivery_tag` and `delivery_count` are always written (the builder omits a 0;
//! both read the same), `redelivered` only when true, empty names are absent (as the builder
//! path writes them: absent and empty read the same), and the message vector is always present
//! (it is `required`). A batch therefore takes the bytes the builder's frame took, give or take
//! alignment padding.

use bytes::{BufMut, BytesMut};
use flatbuffers::VOffsetT;

use super::DeliveryItem;
use crate::limits::{WireLimits, FRAME_PREFIX_BYTES};
use crate::wire::{Body, Deliver, Delivery, Frame};
use crate::ProtocolError;

/// Alignment of a message's first byte in the frame. A message is its own flatbuffer, aligned
/// by its builder relative to its own start: its `long` fields (`timestamp_ms`,
/// `deliver_at_ms`) sit at multiples of 8 from it. Starting it at a multiple of 8 in the frame
/// (and frames at multiples of 8 in the outbox) keeps them 8-aligned for a reader that reads
/// the nested message in place from an 8-aligned receive buffer. The builder would align the
/// vector's data only to 4 (`create_vector::<u8>` aligns its length); flatbuffers' Rust
/// readers load scalars unaligned, so the stronger alignment costs at most 4 bytes and breaks
/// nothing.
const MESSAGE_ALIGN: usize = 8;

/// A frame's length (prefix included) is padded to this, so consecutive `Deliver` frames in one
/// outbox each start as aligned as the first: the largest scalar in a `Deliver` frame is a
/// `ulong` (`delivery_tag`), and the builder pads a buffer to its largest alignment too.
const FRAME_ALIGN: usize = 8;

const U32: usize = 4;

/// The vtable length that holds `slots`: up to the last slot, as the builder trims it.
const fn vtable_len(slots: &[VOffsetT]) -> usize {
    let mut max = 0;
    let mut i = 0;
    while i < slots.len() {
        if slots[i] > max {
            max = slots[i];
        }
        i += 1;
    }
    max as usize + 2
}

/// A vtable: its own length, its table's, then each field's offset in the table at the slot its
/// generated constant names. A field not listed (or given offset 0) is absent.
const fn vtable<const LEN: usize>(table_len: usize, fields: &[(VOffsetT, usize)]) -> [u8; LEN] {
    assert!(LEN.is_multiple_of(2) && LEN <= u16::MAX as usize && table_len <= u16::MAX as usize);
    let mut vt = [0u8; LEN];
    let len = (LEN as u16).to_le_bytes();
    vt[0] = len[0];
    vt[1] = len[1];
    let table = (table_len as u16).to_le_bytes();
    vt[2] = table[0];
    vt[3] = table[1];
    let mut i = 0;
    while i < fields.len() {
        let (slot, offset) = fields[i];
        let slot = slot as usize;
        assert!(slot >= 4 && slot + 2 <= LEN && offset < table_len);
        let offset = (offset as u16).to_le_bytes();
        vt[slot] = offset[0];
        vt[slot + 1] = offset[1];
        i += 1;
    }
    vt
}

const fn align_up(pos: usize, align: usize) -> usize {
    (pos + align - 1) & !(align - 1)
}

// The Frame table: soffset, body (uoffset), body_type (ubyte). `request_id` is 0 on a push, its
// default, so it is absent: its slot reads 0.
const FRAME_BODY: usize = 4;
const FRAME_BODY_TYPE: usize = 8;
const FRAME_TABLE_LEN: usize = 9;
const FRAME_VT_LEN: usize =
    vtable_len(&[Frame::VT_REQUEST_ID, Frame::VT_BODY_TYPE, Frame::VT_BODY]);
const FRAME_VTABLE: [u8; FRAME_VT_LEN] = vtable(
    FRAME_TABLE_LEN,
    &[
        (Frame::VT_BODY_TYPE, FRAME_BODY_TYPE),
        (Frame::VT_BODY, FRAME_BODY),
    ],
);

// The Deliver table: soffset, consumer_tag (uoffset), deliveries (uoffset).
const DELIVER_CONSUMER_TAG: usize = 4;
const DELIVER_DELIVERIES: usize = 8;
const DELIVER_TABLE_LEN: usize = 12;
const DELIVER_VT_LEN: usize = vtable_len(&[Deliver::VT_CONSUMER_TAG, Deliver::VT_DELIVERIES]);
const DELIVER_VTABLE: [u8; DELIVER_VT_LEN] = vtable(
    DELIVER_TABLE_LEN,
    &[
        (Deliver::VT_CONSUMER_TAG, DELIVER_CONSUMER_TAG),
        (Deliver::VT_DELIVERIES, DELIVER_DELIVERIES),
    ],
);

// The frame's fixed head, from its first byte: size prefix, root offset, Frame vtable and table,
// Deliver vtable and table. The consumer tag (if any) follows at `HEAD_LEN`.
const ROOT: usize = FRAME_PREFIX_BYTES;
const FRAME_VT: usize = ROOT + U32;
const FRAME_TABLE: usize = align_up(FRAME_VT + FRAME_VT_LEN, U32);
const DELIVER_VT: usize = align_up(FRAME_TABLE + FRAME_TABLE_LEN, 2);
const DELIVER_TABLE: usize = align_up(DELIVER_VT + DELIVER_VT_LEN, U32);
const HEAD_LEN: usize = DELIVER_TABLE + DELIVER_TABLE_LEN;

// A Delivery table, 4-aligned, laid out by its shape (`DeliveryShape`): soffset, then
// delivery_tag (ulong) and delivery_count (uint) in the order that puts the ulong on a multiple
// of 8 (the table's phase: a table at 8n holds the count first, one at 8n + 4 the tag first),
// then the message's offset and those of the names present, then redelivered if true. Two
// phases: a table starts where the previous message ended, 4-aligned, without padding to 8.
// Absent fields take no bytes, as in the builder's tables.
const DELIVERY_VT_LEN: usize = vtable_len(&[
    Delivery::VT_DELIVERY_TAG,
    Delivery::VT_REDELIVERED,
    Delivery::VT_DELIVERY_COUNT,
    Delivery::VT_EXCHANGE,
    Delivery::VT_ROUTING_KEY,
    Delivery::VT_MESSAGE,
]);
/// Shapes: exchange present (1), routing key present (2), redelivered (4), phase (8).
const DELIVERY_SHAPES: usize = 16;

/// Where each field of a Delivery table of one shape is, from the table's start; 0: absent.
#[derive(Debug, Clone, Copy)]
struct DeliveryShape {
    tag: usize,
    count: usize,
    message: usize,
    exchange: usize,
    routing_key: usize,
    redelivered: usize,
    /// The table's bytes with the padding that keeps what follows 4-aligned.
    bytes: usize,
    vtable: [u8; DELIVERY_VT_LEN],
}

const fn delivery_shape(shape: usize) -> DeliveryShape {
    let phase = shape >> 3;
    let (tag, count) = if phase == 0 { (8, 4) } else { (4, 12) };
    let message = 16;
    // No closures in a const fn: each present field in turn takes the next bytes.
    let mut len = message + U32;
    let routing_key = if shape & 2 != 0 { len } else { 0 };
    len += if shape & 2 != 0 { U32 } else { 0 };
    let exchange = if shape & 1 != 0 { len } else { 0 };
    len += if shape & 1 != 0 { U32 } else { 0 };
    let redelivered = if shape & 4 != 0 { len } else { 0 };
    len += if shape & 4 != 0 { 1 } else { 0 };
    DeliveryShape {
        tag,
        count,
        message,
        exchange,
        routing_key,
        redelivered,
        bytes: align_up(len, U32),
        vtable: vtable(
            len,
            &[
                (Delivery::VT_DELIVERY_TAG, tag),
                (Delivery::VT_REDELIVERED, redelivered),
                (Delivery::VT_DELIVERY_COUNT, count),
                (Delivery::VT_EXCHANGE, exchange),
                (Delivery::VT_ROUTING_KEY, routing_key),
                (Delivery::VT_MESSAGE, message),
            ],
        ),
    }
}

const DELIVERY_SHAPE: [DeliveryShape; DELIVERY_SHAPES] = {
    let mut shapes = [delivery_shape(0); DELIVERY_SHAPES];
    let mut i = 0;
    while i < DELIVERY_SHAPES {
        shapes[i] = delivery_shape(i);
        // A table at 8n + 4 * phase has its ulong on a multiple of 8.
        assert!((shapes[i].tag + 4 * (i >> 3)).is_multiple_of(8));
        assert!(shapes[i].count.is_multiple_of(4) && shapes[i].bytes <= 32);
        i += 1;
    }
    shapes
};

// What the layout relies on, checked at compile time.
const _: () = {
    assert!(FRAME_TABLE.is_multiple_of(U32) && DELIVER_TABLE.is_multiple_of(U32));
    assert!(FRAME_VT.is_multiple_of(2) && DELIVER_VT.is_multiple_of(2));
    assert!(DELIVERY_VT_LEN.is_multiple_of(2));
};

/// Where a string of `len` bytes starting at `at` ends, padded so the next object is 4-aligned:
/// its length, its bytes and its terminator.
const fn string_end(at: usize, len: usize) -> usize {
    align_up(at + U32 + len + 1, U32)
}

/// The positions of one delivery's objects, from the frame's first byte.
#[derive(Debug, Clone, Copy)]
struct DeliveryLayout {
    /// The vtable the table refers to: its own, or an earlier delivery's of the same shape.
    vtable: usize,
    /// The vtable is written right before the table (the first delivery of its shape).
    own_vtable: bool,
    table: usize,
    /// Index into `DELIVERY_SHAPE`.
    shape: usize,
    /// Absent (0) when the name is empty.
    exchange: usize,
    routing_key: usize,
    /// The message vector's length; its bytes follow, `MESSAGE_ALIGN`-aligned.
    message: usize,
}

/// Lays deliveries out one after another. Deliveries of one shape share one vtable, as the
/// builder shares identical vtables: 16 bytes a delivery otherwise. Every pass over the items
/// (checking, the offsets vector, writing) walks them alike.
#[derive(Debug, Clone, Copy)]
struct Walk {
    /// Just past the previous delivery's message (or the offsets vector, before the first).
    at: usize,
    /// By shape: where its vtable is, 0 before the first delivery of that shape.
    vtables: [usize; DELIVERY_SHAPES],
}

impl Walk {
    fn from(at: usize) -> Self {
        Walk {
            at,
            vtables: [0; DELIVERY_SHAPES],
        }
    }

    /// The layout of `item`, placed at the first suitably aligned position after the previous.
    fn next(&mut self, item: &DeliveryItem<'_>) -> DeliveryLayout {
        let fields = usize::from(!item.exchange.is_empty())
            | usize::from(!item.routing_key.is_empty()) << 1
            | usize::from(item.redelivered) << 2;
        let shape_at = |table: usize| fields | (table % 8 / 4) << 3;
        let table = align_up(self.at, U32);
        let shared = self.vtables[shape_at(table)];
        let (vtable, own_vtable, table) = if shared != 0 {
            (shared, false, table)
        } else {
            let vtable = align_up(self.at, 2);
            let table = align_up(vtable + DELIVERY_VT_LEN, U32);
            let slot = &mut self.vtables[shape_at(table)];
            if *slot == 0 {
                *slot = vtable;
            }
            (vtable, true, table)
        };
        let shape = shape_at(table);
        let mut next = table + DELIVERY_SHAPE[shape].bytes;
        let mut string = |s: &str| {
            if s.is_empty() {
                return 0;
            }
            let at = next;
            next = string_end(at, s.len());
            at
        };
        let exchange = string(item.exchange);
        let routing_key = string(item.routing_key);
        let message = align_up(next + U32, MESSAGE_ALIGN) - U32;
        self.at = message + U32 + item.message.len();
        DeliveryLayout {
            vtable,
            own_vtable,
            table,
            shape,
            exchange,
            routing_key,
            message,
        }
    }
}

/// Where the deliveries vector starts, after the head and the consumer tag.
fn deliveries_vector_at(consumer_tag: &str) -> usize {
    if consumer_tag.is_empty() {
        HEAD_LEN
    } else {
        string_end(HEAD_LEN, consumer_tag.len())
    }
}

/// Checks `items` as the builder path would, in the same order (per item: the batch count, then
/// the message's size; then an empty batch; then the frame's size), and returns the frame's
/// whole length, prefix and final padding included.
fn check(
    limits: &WireLimits,
    consumer_tag: &str,
    items: &[DeliveryItem<'_>],
) -> Result<usize, ProtocolError> {
    let vector = deliveries_vector_at(consumer_tag);
    let mut walk = Walk::from(vector + U32 + U32 * items.len());
    for (index, item) in items.iter().enumerate() {
        if index as u32 >= limits.deliver_batch_max {
            return Err(ProtocolError::BatchTooLarge {
                what: "deliver",
                count: index + 1,
                max: limits.deliver_batch_max,
            });
        }
        super::check_message_size(limits, index, item.message)?;
        walk.next(item);
    }
    if items.is_empty() {
        return Err(ProtocolError::Invalid("deliver batch is empty".into()));
    }
    let total = align_up(walk.at, FRAME_ALIGN);
    let len = total - FRAME_PREFIX_BYTES;
    if len > limits.frame_size_max as usize {
        return Err(ProtocolError::EncodeTooLarge {
            len,
            max: limits.frame_size_max,
        });
    }
    Ok(total)
}

/// Appends one `Deliver` frame of `items` to `out`, or nothing and the builder path's refusal.
/// Returns the bytes appended.
pub(super) fn deliver(
    limits: &WireLimits,
    out: &mut BytesMut,
    consumer_tag: &str,
    items: &[DeliveryItem<'_>],
) -> Result<usize, ProtocolError> {
    let total = check(limits, consumer_tag, items)?;
    out.reserve(total);
    let start = out.len();
    let mut w = Writer { out, start };

    // The head. Offsets are from the slot holding them to their target, both known here.
    let vector = deliveries_vector_at(consumer_tag);
    let mut head = [0u8; HEAD_LEN];
    put_u32(&mut head, 0, (total - FRAME_PREFIX_BYTES) as u32);
    put_u32(&mut head, ROOT, (FRAME_TABLE - ROOT) as u32);
    head[FRAME_VT..FRAME_VT + FRAME_VT_LEN].copy_from_slice(&FRAME_VTABLE);
    put_u32(&mut head, FRAME_TABLE, (FRAME_TABLE - FRAME_VT) as u32);
    let body = FRAME_TABLE + FRAME_BODY;
    put_u32(&mut head, body, (DELIVER_TABLE - body) as u32);
    head[FRAME_TABLE + FRAME_BODY_TYPE] = Body::Deliver.0;
    head[DELIVER_VT..DELIVER_VT + DELIVER_VT_LEN].copy_from_slice(&DELIVER_VTABLE);
    put_u32(
        &mut head,
        DELIVER_TABLE,
        (DELIVER_TABLE - DELIVER_VT) as u32,
    );
    let tag_slot = DELIVER_TABLE + DELIVER_CONSUMER_TAG;
    if consumer_tag.is_empty() {
        // Absent, as the builder path writes an empty tag.
        let slot = DELIVER_VT + Deliver::VT_CONSUMER_TAG as usize;
        head[slot..slot + 2].copy_from_slice(&0u16.to_le_bytes());
    } else {
        put_u32(&mut head, tag_slot, (HEAD_LEN - tag_slot) as u32);
    }
    let deliveries = DELIVER_TABLE + DELIVER_DELIVERIES;
    put_u32(&mut head, deliveries, (vector - deliveries) as u32);
    w.out.put_slice(&head);
    if !consumer_tag.is_empty() {
        w.string(consumer_tag);
    }

    // The deliveries vector: each element the offset from its slot to its delivery's table.
    w.fill_to(vector);
    w.out.put_u32_le(items.len() as u32);
    let first = Walk::from(vector + U32 + U32 * items.len());
    let mut walk = first;
    for (i, item) in items.iter().enumerate() {
        let table = walk.next(item).table;
        let slot = vector + U32 + U32 * i;
        w.out.put_u32_le((table - slot) as u32);
    }

    let mut walk = first;
    for item in items {
        let layout = walk.next(item);
        w.delivery(&layout, item);
    }
    w.fill_to(total);
    debug_assert_eq!(w.pos(), total);
    Ok(total)
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + U32].copy_from_slice(&v.to_le_bytes());
}

/// Appends to `out` from `start`, the frame's first byte; positions are from there.
struct Writer<'o> {
    out: &'o mut BytesMut,
    start: usize,
}

impl Writer<'_> {
    fn pos(&self) -> usize {
        self.out.len() - self.start
    }

    /// Zero padding up to `pos`.
    fn fill_to(&mut self, pos: usize) {
        debug_assert!(pos >= self.pos(), "layout went backwards");
        let pad = pos - self.pos();
        self.out.put_bytes(0, pad);
    }

    /// A string at the current position: length, bytes, terminator, padding to 4.
    fn string(&mut self, s: &str) {
        let end = string_end(self.pos(), s.len());
        self.out.put_u32_le(s.len() as u32);
        self.out.put_slice(s.as_bytes());
        self.fill_to(end);
    }

    fn delivery(&mut self, layout: &DeliveryLayout, item: &DeliveryItem<'_>) {
        let shape = &DELIVERY_SHAPE[layout.shape];
        let mut table = [0u8; 32];
        put_u32(&mut table, 0, (layout.table - layout.vtable) as u32);
        put_u32(&mut table, shape.count, item.delivery_count);
        table[shape.tag..shape.tag + 8].copy_from_slice(&item.delivery_tag.to_le_bytes());
        let mut offset = |field: usize, target: usize| {
            if field != 0 {
                put_u32(&mut table, field, (target - (layout.table + field)) as u32);
            }
        };
        offset(shape.exchange, layout.exchange);
        offset(shape.routing_key, layout.routing_key);
        offset(shape.message, layout.message);
        if shape.redelivered != 0 {
            table[shape.redelivered] = 1;
        }
        if layout.own_vtable {
            self.fill_to(layout.vtable);
            self.out.put_slice(&shape.vtable);
        }
        self.fill_to(layout.table);
        self.out.put_slice(&table[..shape.bytes]);
        if layout.exchange != 0 {
            self.string(item.exchange);
        }
        if layout.routing_key != 0 {
            self.string(item.routing_key);
        }
        self.fill_to(layout.message);
        self.out.put_u32_le(item.message.len() as u32);
        // The one copy of the message's bytes.
        self.out.put_slice(item.message);
    }
}

#[cfg(test)]
mod tests;
