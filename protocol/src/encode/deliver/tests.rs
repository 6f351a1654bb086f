//! The front-to-back `Deliver` writer against the builder-based encoder it replaced (kept here
//! as the reference): for any deliveries, its frames pass the decoder the client uses, read as
//! the same values, carry each nested message where it reads in place, and are refused exactly
//! when and as the reference's are.

use bytes::{Bytes, BytesMut};
use flatbuffers::WIPOffset;
use proptest::prelude::*;

use super::FRAME_ALIGN;
use crate::encode::{DeliveryItem, Encoder, MessageProps};
use crate::limits::{deliver_frame_bytes_max, delivery_bytes_max, WireLimits};
use crate::wire::{self, Body};
use crate::{message_unchecked, verify_message, FrameDecoder, ProtocolError};

/// The builder path `Encoder::deliver` took before: every part built back to front in the
/// encoder's `FlatBufferBuilder`, then copied to `out`.
fn reference_deliver(
    enc: &mut Encoder,
    out: &mut BytesMut,
    consumer_tag: &str,
    items: &[DeliveryItem<'_>],
) -> Result<usize, ProtocolError> {
    enc.fbb.reset();
    let mut deliveries: Vec<WIPOffset<wire::Delivery<'static>>> = Vec::new();
    for (index, item) in items.iter().enumerate() {
        if index as u32 >= enc.limits.deliver_batch_max {
            return Err(ProtocolError::BatchTooLarge {
                what: "deliver",
                count: index + 1,
                max: enc.limits.deliver_batch_max,
            });
        }
        enc.check_message_size(index, item.message)?;
        let message = Some(enc.fbb.create_vector(item.message));
        let exchange = enc.optional_string(item.exchange);
        let routing_key = enc.optional_string(item.routing_key);
        deliveries.push(wire::Delivery::create(
            &mut enc.fbb,
            &wire::DeliveryArgs {
                delivery_tag: item.delivery_tag,
                redelivered: item.redelivered,
                delivery_count: item.delivery_count,
                exchange,
                routing_key,
                message,
                deaths: None,
            },
        ));
    }
    if deliveries.is_empty() {
        return Err(ProtocolError::Invalid("deliver batch is empty".into()));
    }
    let deliveries_vec = Some(enc.fbb.create_vector(&deliveries));
    let consumer_tag = enc.optional_string(consumer_tag);
    let body = wire::Deliver::create(
        &mut enc.fbb,
        &wire::DeliverArgs {
            consumer_tag,
            deliveries: deliveries_vec,
        },
    );
    enc.finish(0, Body::Deliver, body.as_union_value(), out)
}

/// One frame from the front of `bytes`, through the client's decoder; all of `bytes` is used.
fn decode(limits: WireLimits, bytes: &[u8]) -> Result<crate::InFrame, ProtocolError> {
    let mut buf = BytesMut::from(bytes);
    let frame = FrameDecoder::new(limits)
        .decode(&mut buf)?
        .expect("a whole frame");
    assert!(buf.is_empty(), "{} bytes after the frame", buf.len());
    Ok(frame)
}

/// What a valid frame must satisfy beyond reading like the reference's.
fn check_in_place(limits: WireLimits, frame: &crate::InFrame, items: &[DeliveryItem<'_>]) {
    let base = frame.bytes().as_ptr() as usize;
    assert_eq!(frame.bytes().len() % FRAME_ALIGN, 0, "frame length");
    let deliveries: Vec<_> = frame.deliveries().collect();
    assert_eq!(deliveries.len(), items.len());
    for ((d, message), item) in deliveries.iter().zip(items) {
        assert_eq!(&message[..], item.message);
        let at = d.message().bytes().as_ptr() as usize - base;
        // 8: the Message table's `long` fields are 8-aligned from its start.
        assert_eq!(at % 8, 0, "message at {at} in the frame");
        // The nested message reads in place, verified and unchecked alike, as it was built.
        let verified = verify_message(d.message().bytes(), &limits).expect("a valid message");
        let original = verify_message(item.message, &limits).unwrap().unpack();
        assert_eq!(verified.unpack(), original);
        // SAFETY: verified just above.
        let unchecked = unsafe { message_unchecked(d.message().bytes()) };
        assert_eq!(unchecked.timestamp_ms(), original.timestamp_ms);
        assert_eq!(unchecked.deliver_at_ms(), original.deliver_at_ms);
        assert_eq!(
            unchecked.body().map(|b| b.bytes()),
            original.body.as_deref()
        );
    }
}

/// Encodes `items` both ways after `prefix` bytes already in the outbox and checks they agree:
/// the same frame read, or the same refusal with nothing appended. True if a frame was read.
fn agree(
    limits: WireLimits,
    prefix: usize,
    consumer_tag: &str,
    items: &[DeliveryItem<'_>],
) -> bool {
    let mut enc = Encoder::new(limits);
    let mut reference = Encoder::new(limits);
    let mut out = BytesMut::from(&vec![0xee; prefix][..]);
    let mut expected = BytesMut::new();
    let got = enc.deliver(&mut out, consumer_tag, items.iter().copied());
    let want = reference_deliver(&mut reference, &mut expected, consumer_tag, items);
    let mut read = false;
    match (got, want) {
        (Ok(len), Ok(_)) => {
            assert_eq!(
                len,
                out.len() - prefix,
                "the length returned is what was appended"
            );
            assert!(
                out[..prefix].iter().all(|b| *b == 0xee),
                "bytes before it kept"
            );
            match (decode(limits, &out[prefix..]), decode(limits, &expected)) {
                (Ok(frame), Ok(expected)) => {
                    assert_eq!(frame.frame().unpack(), expected.frame().unpack());
                    check_in_place(limits, &frame, items);
                    read = true;
                }
                // A frame the encoders agree to write may still be refused by the decoder
                // (under tight limits, a message's verification can count more bytes than it
                // has): then both are, alike.
                (Err(got), Err(want)) => assert_eq!(got.to_string(), want.to_string()),
                (got, want) => panic!("decoded new: {got:?}, reference: {want:?}"),
            }
            let bound = deliver_frame_bytes_max(consumer_tag.len())
                + items
                    .iter()
                    .map(|i| {
                        delivery_bytes_max(i.message.len(), i.exchange.len(), i.routing_key.len())
                    })
                    .sum::<usize>();
            assert!(len - 4 <= bound, "{len} bytes beyond the bound {bound}");
            // The slice path (the broker's) writes the same bytes.
            let mut again = BytesMut::new();
            let count = enc.deliver_prefix(&mut again, consumer_tag, items).unwrap();
            if count == items.len() {
                assert_eq!(&again[..], &out[prefix..]);
            }
        }
        (Err(got), Err(want)) => {
            assert_eq!(out.len(), prefix, "a refusal appends nothing");
            match (&got, &want) {
                // The lengths are each layout's own; both are over the same limit.
                (
                    ProtocolError::EncodeTooLarge { len: a, max: m },
                    ProtocolError::EncodeTooLarge { len: b, max: n },
                ) => {
                    assert_eq!(m, n);
                    assert!(*a > *m as usize && *b > *n as usize, "{got} / {want}");
                }
                _ => assert_eq!(got.to_string(), want.to_string()),
            }
        }
        (got, want) => panic!("new: {got:?}, reference: {want:?}"),
    }
    read
}

#[derive(Debug, Clone)]
struct MessageSpec {
    body_len: usize,
    timestamp_ms: i64,
    deliver_at_ms: Option<i64>,
    headers: usize,
    content_type: Option<String>,
    /// Bytes after the flatbuffer (it still verifies), so a message can be any length, not only
    /// the builder's multiples of 4.
    trailing: usize,
}

fn build(spec: &MessageSpec) -> Bytes {
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    let body: Vec<u8> = (0..spec.body_len).map(|i| (i * 7 % 251) as u8).collect();
    let headers: Vec<(&str, &[u8])> = (0..spec.headers)
        .map(|i| (["a", "bb", "ccc"][i % 3], &b"xyz"[..i % 3]))
        .collect();
    let props = MessageProps {
        timestamp_ms: spec.timestamp_ms,
        deliver_at_ms: spec.deliver_at_ms,
        headers: &headers,
        content_type: spec.content_type.as_deref(),
        ..MessageProps::default()
    };
    let message = enc.message(&props, &body).unwrap();
    let mut bytes = message.to_vec();
    bytes.extend(std::iter::repeat_n(0xa5, spec.trailing));
    Bytes::from(bytes)
}

fn message_spec() -> impl Strategy<Value = MessageSpec> {
    (
        prop_oneof![0usize..8, 0usize..4096],
        any::<i64>(),
        proptest::option::of(any::<i64>()),
        0usize..4,
        proptest::option::of("[a-z/]{0,13}"),
        prop_oneof![Just(0usize), 0usize..8],
    )
        .prop_map(
            |(body_len, timestamp_ms, deliver_at_ms, headers, content_type, trailing)| {
                MessageSpec {
                    body_len,
                    timestamp_ms,
                    deliver_at_ms,
                    headers,
                    content_type,
                    trailing,
                }
            },
        )
}

/// A name of any length the decoder accepts, empty often.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z.]{1,13}",
        "[a-zé]{0,3}",
        "[A-Z0-9]{200,255}",
    ]
}

#[derive(Debug, Clone)]
struct ItemSpec {
    delivery_tag: u64,
    redelivered: bool,
    delivery_count: u32,
    exchange: String,
    routing_key: String,
    message: usize,
}

fn item_spec() -> impl Strategy<Value = ItemSpec> {
    (
        prop_oneof![any::<u64>(), 0u64..3],
        any::<bool>(),
        prop_oneof![any::<u32>(), 0u32..3],
        name(),
        name(),
        any::<usize>(),
    )
        .prop_map(
            |(delivery_tag, redelivered, delivery_count, exchange, routing_key, message)| {
                ItemSpec {
                    delivery_tag,
                    redelivered,
                    delivery_count,
                    exchange,
                    routing_key,
                    message,
                }
            },
        )
}

fn items<'a>(specs: &'a [ItemSpec], messages: &'a [Bytes]) -> Vec<DeliveryItem<'a>> {
    specs
        .iter()
        .map(|s| DeliveryItem {
            delivery_tag: s.delivery_tag,
            redelivered: s.redelivered,
            delivery_count: s.delivery_count,
            exchange: &s.exchange,
            routing_key: &s.routing_key,
            message: &messages[s.message % messages.len()],
            deaths: &[],
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Valid batches of 1..=deliver_batch_max: the same frame, read in place.
    #[test]
    fn a_deliver_written_front_to_back_reads_as_the_builders(
        batch_max in 1u32..=48,
        messages in proptest::collection::vec(message_spec(), 1..6),
        specs in proptest::collection::vec(item_spec(), 1..=48),
        consumer_tag in name(),
        prefix in 0usize..9,
    ) {
        let limits = WireLimits { deliver_batch_max: batch_max, ..WireLimits::DEFAULT };
        let messages: Vec<Bytes> = messages.iter().map(build).collect();
        let specs = &specs[..specs.len().min(batch_max as usize)];
        prop_assert!(agree(limits, prefix, &consumer_tag, &items(specs, &messages)));
    }

    /// Tight limits, so batches, messages and frames are often too large: the same refusals.
    #[test]
    fn a_deliver_is_refused_as_the_builder_refused_it(
        batch_max in 1u32..8,
        message_size_max in 16u32..3000,
        frame_size_max in 1024u32..12_000,
        messages in proptest::collection::vec(message_spec(), 1..4),
        specs in proptest::collection::vec(item_spec(), 0..12),
        consumer_tag in name(),
    ) {
        let limits = WireLimits {
            deliver_batch_max: batch_max,
            message_size_max,
            frame_size_max,
            ..WireLimits::DEFAULT
        };
        let messages: Vec<Bytes> = messages.iter().map(build).collect();
        let _ = agree(limits, 3, &consumer_tag, &items(&specs, &messages));
    }
}

#[test]
fn a_full_batch_at_the_default_limits_reads_as_the_builders() {
    let limits = WireLimits::DEFAULT;
    let messages: Vec<Bytes> = (0..7)
        .map(|i| {
            build(&MessageSpec {
                body_len: 1024 + i,
                timestamp_ms: 1_795_000_000_000 + i as i64,
                deliver_at_ms: (i % 2 == 0).then_some(-(i as i64)),
                headers: i % 3,
                content_type: None,
                trailing: i,
            })
        })
        .collect();
    let specs: Vec<ItemSpec> = (0..limits.deliver_batch_max as usize)
        .map(|i| ItemSpec {
            delivery_tag: 1 << 40 | i as u64,
            redelivered: i % 5 == 0,
            delivery_count: (i % 4) as u32,
            exchange: "x".repeat(i % 9),
            routing_key: "k".repeat(i % 11),
            message: i,
        })
        .collect();
    let all = items(&specs, &messages);
    assert!(agree(limits, 0, "tag", &all));
    // One more than the limit, and none at all.
    let mut over = all.clone();
    over.push(all[0]);
    assert!(!agree(limits, 0, "tag", &over));
    assert!(!agree(limits, 0, "tag", &[]));
}

#[test]
fn the_message_starts_8_aligned_for_every_name_and_tag_length() {
    let limits = WireLimits::DEFAULT;
    let message = build(&MessageSpec {
        body_len: 5,
        timestamp_ms: -1,
        deliver_at_ms: Some(i64::MAX),
        headers: 1,
        content_type: Some("t".into()),
        trailing: 0,
    });
    for tag in 0..9 {
        for exchange in 0..9 {
            for routing_key in 0..9 {
                let (x, k) = ("x".repeat(exchange), "k".repeat(routing_key));
                let items = [0, 1].map(|i| DeliveryItem {
                    delivery_tag: i,
                    redelivered: i == 1,
                    delivery_count: 1,
                    exchange: &x,
                    routing_key: &k,
                    message: &message,
                    deaths: &[],
                });
                assert!(agree(limits, tag % 3, &"t".repeat(tag), &items));
            }
        }
    }
}
