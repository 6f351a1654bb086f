//! Codec microbenchmarks: what the wire costs per message, before any socket or disk.
//!
//! - publish of one message with a 1 KiB body: encode (message + frame), decode+verify;
//! - publish of a batch of 100 messages with 100 B bodies: the same, per message;
//! - zero-copy slicing of every message's bytes out of a decoded batch;
//! - deliver of 1 and of 64 messages with 1 KiB bodies: the broker's side of the delivery path
//!   (`Encoder::deliver` into a connection's outbox), per delivery.
//!
//! Run: `cargo bench --bench codec`. Frame overheads are printed first (bytes on the wire beyond
//! the bodies), so a report can quote both from one run.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use weir_protocol::{DeliveryItem, Encoder, FrameDecoder, MessageProps, PublishItem, WireLimits};

const ROUTING_KEY: &str = "orders.eu.created";

/// A publish frame of `count` messages with `body_len`-byte bodies and no properties.
fn publish_frame(enc: &mut Encoder, count: usize, body_len: usize) -> (BytesMut, Vec<Bytes>) {
    let body = vec![0x5a; body_len];
    let messages: Vec<Bytes> = (0..count)
        .map(|_| enc.message(&MessageProps::default(), &body).unwrap())
        .collect();
    let mut out = BytesMut::new();
    enc.publish(&mut out, 1, None, true, items(&messages))
        .unwrap();
    (out, messages)
}

fn items(messages: &[Bytes]) -> impl Iterator<Item = PublishItem<'_>> {
    messages.iter().enumerate().map(|(i, m)| PublishItem {
        sequence: i as u64,
        exchange: "",
        routing_key: ROUTING_KEY,
        mandatory: false,
        message: m,
    })
}

fn deliveries(messages: &[Bytes]) -> impl Iterator<Item = DeliveryItem<'_>> {
    messages.iter().enumerate().map(|(i, m)| DeliveryItem {
        delivery_tag: i as u64 + 1,
        redelivered: false,
        delivery_count: 1,
        exchange: "",
        routing_key: ROUTING_KEY,
        message: m,
        deaths: &[],
    })
}

const CONSUMER_TAG: &str = "ctag-1";

fn report_overheads() {
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    for (count, body_len) in [(1, 1024), (1, 100), (100, 100)] {
        let (frame, messages) = publish_frame(&mut enc, count, body_len);
        let message_len = messages[0].len();
        let overhead = frame.len() - count * body_len;
        println!(
            "overhead: publish of {count} x {body_len} B body (routing key {} B, no properties): message {message_len} B, \
             frame {} B, {overhead} B beyond the bodies = {:.1} B per message",
            ROUTING_KEY.len(),
            frame.len(),
            overhead as f64 / count as f64,
        );
    }
}

fn codec(c: &mut Criterion) {
    report_overheads();
    let limits = WireLimits::DEFAULT;
    let decoder = FrameDecoder::new(limits);
    let mut enc = Encoder::new(limits);

    for (name, count, body_len) in [
        ("publish_1x1KiB", 1usize, 1024usize),
        ("publish_100x100B", 100, 100),
    ] {
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(count as u64));
        let body = vec![0x5a; body_len];
        let (frame, messages) = publish_frame(&mut enc, count, body_len);

        group.bench_function("encode_messages", |b| {
            b.iter(|| {
                for _ in 0..count {
                    std::hint::black_box(enc.message(&MessageProps::default(), &body).unwrap());
                }
            })
        });
        let mut out = BytesMut::with_capacity(frame.len() * 2);
        group.bench_function("encode_frame", |b| {
            b.iter(|| {
                out.clear();
                enc.publish(&mut out, 1, None, true, items(&messages))
                    .unwrap();
                std::hint::black_box(out.len())
            })
        });
        group.bench_function("decode_verify", |b| {
            b.iter_batched(
                || BytesMut::from(&frame[..]),
                |mut buf| decoder.decode(&mut buf).unwrap().unwrap(),
                BatchSize::SmallInput,
            )
        });
        let decoded = decoder
            .decode(&mut BytesMut::from(&frame[..]))
            .unwrap()
            .unwrap();
        group.bench_function("slice_messages", |b| {
            b.iter(|| {
                let mut n = 0;
                for (_, bytes) in decoded.publish_entries() {
                    n += std::hint::black_box(bytes).len();
                }
                n
            })
        });
        group.finish();
    }

    for (name, count) in [("deliver_1x1KiB", 1usize), ("deliver_64x1KiB", 64)] {
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(count as u64));
        let body = vec![0x5a; 1024];
        let messages: Vec<Bytes> = (0..count)
            .map(|_| enc.message(&MessageProps::default(), &body).unwrap())
            .collect();
        let mut out = BytesMut::new();
        enc.deliver(&mut out, CONSUMER_TAG, deliveries(&messages))
            .unwrap();
        let frame_len = out.len();
        let overhead = frame_len - count * messages[0].len();
        println!(
            "overhead: deliver of {count} x {} B message (1 KiB body, routing key {} B): frame {frame_len} B, \
             {overhead} B beyond the messages = {:.1} B per delivery",
            messages[0].len(),
            ROUTING_KEY.len(),
            overhead as f64 / count as f64,
        );
        // The outbox is emptied by each socket write: encode into a cleared buffer, as a
        // connection does between writes.
        out.reserve(frame_len * 2);
        group.bench_function("encode_frame", |b| {
            b.iter(|| {
                out.clear();
                enc.deliver(&mut out, CONSUMER_TAG, deliveries(&messages))
                    .unwrap();
                std::hint::black_box(out.len())
            })
        });
        let frame = out.clone();
        group.bench_function("decode_verify", |b| {
            b.iter_batched(
                || BytesMut::from(&frame[..]),
                |mut buf| decoder.decode(&mut buf).unwrap().unwrap(),
                BatchSize::SmallInput,
            )
        });
        group.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
