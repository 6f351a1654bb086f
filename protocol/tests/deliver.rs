//! A `Deliver` batch of any size leaves as whole frames: split by count and by bytes, in order,
//! each frame within `frame_size_max`, and the byte bounds the split relies on hold for what the
//! encoder really writes.

use bytes::BytesMut;
use weir_protocol::limits::{deliver_frame_bytes_max, delivery_bytes_max, FRAME_PREFIX_BYTES};
use weir_protocol::{samples, DeliveryItem, Encoder, FrameDecoder, WireLimits};

/// Small frames, so a batch several frames large stays small in memory.
const SMALL: WireLimits = WireLimits {
    frame_size_max: 256 * 1024,
    message_size_max: 192 * 1024,
    deliver_batch_max: 16,
    ..WireLimits::DEFAULT
};

fn name(len: usize, c: char) -> String {
    std::iter::repeat_n(c, len).collect()
}

/// A delivery as decoded: tag, exchange, routing key, message.
type Decoded = (u64, String, String, Vec<u8>);

/// Encodes `items` with `deliver_prefix` until all are out; returns the frames' lengths (after
/// the prefix) and every delivery decoded, as (tag, exchange, routing key, message).
fn deliver_all(
    limits: WireLimits,
    consumer_tag: &str,
    items: &[DeliveryItem<'_>],
) -> (Vec<usize>, Vec<Decoded>) {
    let mut enc = Encoder::new(limits);
    let mut out = BytesMut::new();
    let mut at = 0;
    while at < items.len() {
        let before = out.len();
        let count = enc
            .deliver_prefix(&mut out, consumer_tag, &items[at..])
            .expect("every delivery fits a frame");
        assert!(count > 0, "no progress at item {at}");
        assert!(out.len() > before, "nothing appended at item {at}");
        at += count;
    }
    let decoder = FrameDecoder::new(limits);
    let mut lens = Vec::new();
    let mut got = Vec::new();
    while !out.is_empty() {
        let whole = out.len();
        let frame = decoder
            .decode(&mut out)
            .expect("a valid frame")
            .expect("a whole frame");
        lens.push(whole - out.len() - FRAME_PREFIX_BYTES);
        assert_eq!(
            frame.frame().body_as_deliver().unwrap().consumer_tag(),
            Some(consumer_tag)
        );
        for (d, message) in frame.deliveries() {
            got.push((
                d.delivery_tag(),
                d.exchange().unwrap_or("").to_string(),
                d.routing_key().unwrap_or("").to_string(),
                message.to_vec(),
            ));
        }
    }
    (lens, got)
}

#[test]
fn a_batch_several_frames_large_is_split_into_whole_frames_in_order() {
    // 40 messages of 20..190 KB with names of the longest length: about 20 frames' worth.
    let messages: Vec<Vec<u8>> = (0..40)
        .map(|i| samples::message_bytes(20_000 + (i * 37_000) % 170_000))
        .collect();
    let (exchange, key, tag) = (name(255, 'x'), name(255, 'k'), name(255, 't'));
    let items: Vec<DeliveryItem<'_>> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| DeliveryItem {
            delivery_tag: 100 + i as u64,
            redelivered: false,
            delivery_count: 1,
            exchange: &exchange,
            routing_key: &key,
            message: m,
            deaths: &[],
        })
        .collect();
    let total: usize = messages.iter().map(Vec::len).sum();
    assert!(total > 4 * SMALL.frame_size_max as usize, "{total}");

    let (lens, got) = deliver_all(SMALL, &tag, &items);
    assert!(lens.len() > 4, "{} frames", lens.len());
    for len in &lens {
        assert!(
            *len <= SMALL.frame_size_max as usize,
            "a frame of {len} bytes"
        );
    }
    assert_eq!(got.len(), items.len(), "every delivery encoded once");
    for (i, (t, x, k, m)) in got.iter().enumerate() {
        assert_eq!(*t, 100 + i as u64, "delivery {i} out of order");
        assert_eq!((x, k), (&exchange, &key));
        assert_eq!(m, &messages[i], "delivery {i}'s message");
    }
}

#[test]
fn small_deliveries_are_split_by_count() {
    let message = samples::message_bytes(8);
    let items: Vec<DeliveryItem<'_>> = (0..50)
        .map(|i| DeliveryItem {
            delivery_tag: i + 1,
            redelivered: false,
            delivery_count: 1,
            exchange: "",
            routing_key: "q",
            message: &message,
            deaths: &[],
        })
        .collect();
    let (lens, got) = deliver_all(SMALL, "c", &items);
    assert_eq!(lens.len(), 4, "50 deliveries of at most 16 a frame");
    let tags: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(tags, (1..=50).collect::<Vec<_>>());
}

#[test]
fn a_maximal_message_leaves_alone_in_a_frame() {
    let message = samples::message_bytes(SMALL.message_size_max as usize - 1024);
    assert!(message.len() <= SMALL.message_size_max as usize);
    let items = [0, 1].map(|i| DeliveryItem {
        delivery_tag: i + 1,
        redelivered: false,
        delivery_count: 1,
        exchange: "x",
        routing_key: "k",
        message: &message,
        deaths: &[],
    });
    let (lens, got) = deliver_all(SMALL, "c", &items);
    assert_eq!(lens.len(), 2);
    assert_eq!(got.len(), 2);
}

#[test]
fn deliver_bounds_cover_what_the_encoder_writes() {
    // Every alignment of every variable part, one delivery and several to a frame.
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    for tag_len in [0, 1, 3, 4, 7, 255] {
        for name_len in [0, 1, 2, 5, 8, 255] {
            for body_len in [0, 1, 2, 3, 5, 1000] {
                let message = samples::message_bytes(body_len);
                let (tag, x, k) = (name(tag_len, 't'), name(name_len, 'x'), name(name_len, 'k'));
                for count in [1, 3] {
                    let items = (0..count).map(|i| DeliveryItem {
                        delivery_tag: u64::MAX - i,
                        redelivered: true,
                        delivery_count: u32::MAX,
                        exchange: &x,
                        routing_key: &k,
                        message: &message,
                        deaths: &[],
                    });
                    let mut out = BytesMut::new();
                    let len = enc.deliver(&mut out, &tag, items).unwrap() - FRAME_PREFIX_BYTES;
                    let bound = deliver_frame_bytes_max(tag_len)
                        + count as usize * delivery_bytes_max(message.len(), name_len, name_len);
                    assert!(
                        len <= bound,
                        "{len} > {bound}: tag {tag_len}, names {name_len}, body {body_len}, {count} deliveries"
                    );
                }
            }
        }
    }
}
