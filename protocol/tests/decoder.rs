//! The decoder against hostile and unlucky input: every byte boundary, every truncation, every
//! single-bit flip of every sample frame, random bytes, oversized lengths, and each rule the
//! verifier cannot see. The decoder must never panic, never allocate past its limit, and always
//! answer with a frame, "need more bytes", or a typed error.

use bytes::{BufMut, BytesMut};
use flatbuffers::FlatBufferBuilder;
use proptest::prelude::*;
use weir_protocol::wire::{self, Body, BodyT, ErrorCode};
use weir_protocol::{
    samples, Encoder, FrameDecoder, InFrame, ProtocolError, PublishItem, WireLimits,
};

/// Every sample, encoded back to back: the stream a busy connection might carry.
fn sample_stream() -> (BytesMut, Vec<BytesMut>) {
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    let mut stream = BytesMut::new();
    let mut each = Vec::new();
    for frame in samples::frames() {
        let mut one = BytesMut::new();
        enc.encode(&frame, &mut one).unwrap();
        stream.extend_from_slice(&one);
        each.push(one);
    }
    (stream, each)
}

/// Decodes everything `buf` holds; panics on an error (these inputs are valid).
fn drain(decoder: &FrameDecoder, buf: &mut BytesMut, into: &mut Vec<InFrame>) {
    while let Some(frame) = decoder.decode(buf).expect("valid input") {
        into.push(frame);
    }
}

/// Decodes until "need more bytes" or an error; returns the frames and the error, if any.
fn decode_all(decoder: &FrameDecoder, buf: &mut BytesMut) -> (Vec<InFrame>, Option<ProtocolError>) {
    let mut frames = Vec::new();
    loop {
        match decoder.decode(buf) {
            Ok(Some(f)) => {
                // Whatever passed verification must be readable in full without panicking.
                let _ = f.frame().unpack();
                frames.push(f)
            }
            Ok(None) => return (frames, None),
            Err(e) if e.is_fatal() => return (frames, Some(e)),
            Err(_) => continue,
        }
    }
}

#[test]
fn a_stream_split_at_every_byte_boundary_decodes_to_the_same_frames() {
    let (stream, each) = sample_stream();
    let decoder = FrameDecoder::new(WireLimits::DEFAULT);
    for split in 0..=stream.len() {
        let mut buf = BytesMut::from(&stream[..split]);
        let mut frames = Vec::new();
        drain(&decoder, &mut buf, &mut frames);
        buf.extend_from_slice(&stream[split..]);
        drain(&decoder, &mut buf, &mut frames);
        assert!(buf.is_empty(), "split {split}: {} bytes left", buf.len());
        assert_eq!(frames.len(), each.len(), "split {split}");
        for (got, want) in frames.iter().zip(&each) {
            assert_eq!(&got.bytes()[..], &want[..], "split {split}");
        }
    }
}

#[test]
fn a_stream_fed_one_byte_at_a_time_decodes_to_the_same_frames() {
    let (stream, each) = sample_stream();
    let decoder = FrameDecoder::new(WireLimits::DEFAULT);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for byte in stream.iter() {
        buf.put_u8(*byte);
        drain(&decoder, &mut buf, &mut frames);
    }
    let got: Vec<_> = frames.iter().map(|f| f.frame().unpack()).collect();
    assert_eq!(got, samples::frames());
    assert_eq!(frames.len(), each.len());
}

#[test]
fn every_truncation_of_every_frame_needs_more_bytes_and_consumes_nothing() {
    let (_, each) = sample_stream();
    let decoder = FrameDecoder::new(WireLimits::DEFAULT);
    for frame in &each {
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            assert!(
                decoder.decode(&mut buf).unwrap().is_none(),
                "cut at {cut} of {}",
                frame.len()
            );
            assert_eq!(buf.len(), cut, "a truncated frame was consumed");
        }
    }
}

#[test]
fn a_length_over_the_maximum_is_refused_before_any_allocation() {
    let limits = WireLimits::DEFAULT;
    let decoder = FrameDecoder::new(limits);
    for len in [limits.frame_size_max + 1, u32::MAX] {
        let mut buf = BytesMut::with_capacity(8);
        buf.put_u32_le(len);
        let before = buf.capacity();
        let err = decoder.decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::FrameTooLarge {
                len: u64::from(len),
                max: limits.frame_size_max
            }
        );
        assert!(err.is_fatal());
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert_eq!(
            buf.capacity(),
            before,
            "the buffer grew for a refused frame"
        );
    }
}

#[test]
fn a_length_within_the_maximum_reserves_exactly_the_announced_frame() {
    let decoder = FrameDecoder::new(WireLimits::DEFAULT);
    let mut buf = BytesMut::new();
    buf.put_u32_le(100_000);
    assert!(decoder.decode(&mut buf).unwrap().is_none());
    assert!(
        buf.capacity() >= 100_004,
        "no room reserved for the announced frame"
    );
    assert!(
        buf.capacity() < 2 * 100_004,
        "reserved far more than the frame"
    );
}

#[test]
fn every_single_bit_flip_of_every_sample_is_a_frame_or_a_typed_error() {
    let (_, each) = sample_stream();
    let decoder = FrameDecoder::new(WireLimits::DEFAULT);
    let (mut refused, mut accepted, mut waiting) = (0u64, 0u64, 0u64);
    for frame in &each {
        for bit in 0..frame.len() * 8 {
            let mut buf = frame.clone();
            buf[bit / 8] ^= 1 << (bit % 8);
            let (frames, error) = decode_all(&decoder, &mut buf);
            accepted += frames.len() as u64;
            match error {
                Some(e) => {
                    refused += 1;
                    assert_ne!(e.code(), ErrorCode::None);
                    assert!(!e.to_string().is_empty());
                }
                None if frames.is_empty() => waiting += 1,
                None => {}
            }
        }
    }
    // A flip in the length prefix can make a frame look longer (waiting) or too large (refused);
    // a flip in a value can yield another valid frame. All three must occur; none may panic.
    assert!(
        refused > 1000 && accepted > 1000 && waiting > 0,
        "refused {refused} accepted {accepted} waiting {waiting}"
    );
}

fn small_limits() -> WireLimits {
    WireLimits {
        frame_size_max: 256 * 1024,
        message_size_max: 128 * 1024,
        publish_batch_max: 8,
        deliver_batch_max: 8,
        verifier_tables_max: 4 * 8 + 64,
        ..WireLimits::DEFAULT
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_and_never_allocate_past_the_limit(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let limits = small_limits();
        let decoder = FrameDecoder::new(limits);
        let mut buf = BytesMut::from(&bytes[..]);
        let (_, error) = decode_all(&decoder, &mut buf);
        if let Some(e) = error {
            prop_assert!(e.is_fatal());
        }
        prop_assert!(buf.capacity() <= (bytes.len() + 4 + limits.frame_size_max as usize).max(64));
    }

    #[test]
    fn random_bodies_behind_a_plausible_length_are_frames_or_typed_errors(
        body in proptest::collection::vec(any::<u8>(), 0..1024),
        extra in 0u32..4,
    ) {
        let decoder = FrameDecoder::new(small_limits());
        let mut buf = BytesMut::new();
        buf.put_u32_le(body.len() as u32 + extra);
        buf.extend_from_slice(&body);
        match decoder.decode(&mut buf) {
            Ok(Some(f)) => { let _ = f.frame().unpack(); }
            Ok(None) => prop_assert!(extra > 0, "a whole frame was not decoded"),
            Err(e) => prop_assert_ne!(e.code(), ErrorCode::None),
        }
    }

    #[test]
    fn random_flips_of_a_publish_are_frames_or_typed_errors(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..8),
    ) {
        let (_, each) = sample_stream();
        let at = samples::bodies().iter().position(|b| b.body_type() == Body::Publish).unwrap();
        let publish = &each[at];
        let mut buf = publish.clone();
        for (at, bit) in flips {
            let i = at.index(buf.len());
            buf[i] ^= 1 << bit;
        }
        decode_all(&FrameDecoder::new(WireLimits::DEFAULT), &mut buf);
    }

    #[test]
    fn random_publish_batches_round_trip_split_anywhere(
        entries in proptest::collection::vec(
            ("[a-z.]{0,20}", "[a-z.*#]{0,40}", any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300)),
            1..8,
        ),
        split in any::<prop::sample::Index>(),
    ) {
        let limits = small_limits();
        let mut enc = Encoder::new(limits);
        let messages: Vec<_> = entries
            .iter()
            .map(|(_, _, _, body)| enc.message(&Default::default(), body).unwrap())
            .collect();
        let mut out = BytesMut::new();
        let items = entries.iter().zip(&messages).enumerate().map(|(i, ((x, k, m, _), msg))| PublishItem {
            sequence: i as u64,
            exchange: x,
            routing_key: k,
            mandatory: *m,
            message: msg,
        });
        enc.publish(&mut out, 7, None, true, items).unwrap();
        let at = split.index(out.len() + 1);
        let mut buf = out.split_to(at);
        let decoder = FrameDecoder::new(limits);
        if !out.is_empty() {
            prop_assert!(decoder.decode(&mut buf).unwrap().is_none());
        }
        buf.unsplit(out);
        let frame = decoder.decode(&mut buf).unwrap().unwrap();
        let got: Vec<_> = frame.publish_entries().collect();
        prop_assert_eq!(got.len(), entries.len());
        for (i, ((e, bytes), (x, k, m, body))) in got.iter().zip(&entries).enumerate() {
            prop_assert_eq!(e.sequence(), i as u64);
            prop_assert_eq!(e.exchange().unwrap_or(""), x.as_str());
            prop_assert_eq!(e.routing_key().unwrap_or(""), k.as_str());
            prop_assert_eq!(e.mandatory(), *m);
            prop_assert_eq!(&bytes[..], &messages[i][..]);
            let message = e.message_nested_flatbuffer();
            prop_assert_eq!(message.body().map(|b| b.bytes()).unwrap_or(&[]), &body[..]);
        }
    }
}

// ---- the rules the verifier cannot see, each with its typed error ----

fn encode_unchecked(body: BodyT) -> BytesMut {
    let mut out = BytesMut::new();
    Encoder::new(WireLimits::DEFAULT)
        .encode(&weir_protocol::frame(1, body), &mut out)
        .unwrap();
    out
}

fn publish_of(messages: Vec<Vec<u8>>) -> BodyT {
    let mut p = wire::PublishT::default();
    p.entries = messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let mut e = wire::PublishEntryT::default();
            e.sequence = i as u64;
            e.routing_key = Some("q".into());
            e.message = message;
            e
        })
        .collect();
    BodyT::Publish(Box::new(p))
}

fn decode_err(buf: BytesMut, limits: WireLimits) -> ProtocolError {
    let mut buf = buf;
    FrameDecoder::new(limits)
        .decode(&mut buf)
        .expect_err("the decoder accepted it")
}

#[test]
fn an_empty_publish_is_invalid() {
    let err = decode_err(encode_unchecked(publish_of(vec![])), WireLimits::DEFAULT);
    assert!(
        matches!(err, ProtocolError::Invalid(ref s) if s.contains("empty")),
        "{err}"
    );
    assert!(err.is_fatal());
}

#[test]
fn a_publish_over_the_batch_limit_is_refused() {
    let limits = small_limits();
    let buf = encode_unchecked(publish_of(vec![samples::message_bytes(1); 9]));
    let err = decode_err(buf, limits);
    assert_eq!(
        err,
        ProtocolError::BatchTooLarge {
            what: "publish",
            count: 9,
            max: 8
        }
    );
    assert_eq!(err.code(), ErrorCode::LimitExceeded);
}

#[test]
fn a_message_over_the_size_limit_is_refused() {
    let limits = small_limits();
    let big = samples::message_bytes(limits.message_size_max as usize);
    let len = big.len();
    let err = decode_err(
        encode_unchecked(publish_of(vec![samples::message_bytes(1), big])),
        limits,
    );
    assert_eq!(
        err,
        ProtocolError::MessageTooLarge {
            index: 1,
            len,
            max: limits.message_size_max
        }
    );
    assert_eq!(err.code(), ErrorCode::MessageTooLarge);
}

#[test]
fn a_nested_message_that_is_not_a_message_is_refused_with_its_index() {
    let err = decode_err(
        encode_unchecked(publish_of(vec![samples::message_bytes(1), vec![0xff; 40]])),
        WireLimits::DEFAULT,
    );
    assert!(
        matches!(err, ProtocolError::MalformedMessage { index: 1, .. }),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::MalformedFrame);
}

#[test]
fn a_message_with_too_many_headers_is_refused() {
    let limits = WireLimits {
        headers_max: 2,
        ..WireLimits::DEFAULT
    };
    let mut m = samples::message(1);
    m.headers = Some(
        (0..3)
            .map(|i| {
                let mut h = wire::HeaderT::default();
                h.key = format!("h{i}");
                h
            })
            .collect(),
    );
    let mut fbb = FlatBufferBuilder::new();
    let root = m.pack(&mut fbb);
    fbb.finish(root, None);
    let err = decode_err(
        encode_unchecked(publish_of(vec![fbb.finished_data().to_vec()])),
        limits,
    );
    assert!(
        matches!(err, ProtocolError::MalformedMessage { index: 0, .. }),
        "{err}"
    );
}

#[test]
fn a_name_over_the_length_limit_is_refused() {
    let mut d = wire::DeclareQueueT::default();
    d.name = Some("q".repeat(256));
    let err = decode_err(
        encode_unchecked(BodyT::DeclareQueue(Box::new(d))),
        WireLimits::DEFAULT,
    );
    assert!(
        matches!(err, ProtocolError::Invalid(ref s) if s.contains("name_length_max")),
        "{err}"
    );
}

#[test]
fn a_reversed_ack_range_is_refused() {
    let mut a = wire::AckT::default();
    a.ranges = vec![wire::RangeT { first: 5, last: 4 }];
    let err = decode_err(
        encode_unchecked(BodyT::Ack(Box::new(a))),
        WireLimits::DEFAULT,
    );
    assert!(
        matches!(err, ProtocolError::Invalid(ref s) if s.contains("reversed")),
        "{err}"
    );
}

#[test]
fn a_frame_without_a_body_is_refused_by_encoder_and_decoder() {
    let mut out = BytesMut::new();
    let err = Encoder::new(WireLimits::DEFAULT)
        .encode(&weir_protocol::frame(1, BodyT::NONE), &mut out)
        .unwrap_err();
    assert!(matches!(err, ProtocolError::Invalid(_)), "{err}");
    assert!(out.is_empty());

    // A peer's frame whose body type says NONE (the builder insists on the body field itself).
    let mut fbb = FlatBufferBuilder::new();
    let ok = wire::Ok::create(&mut fbb, &wire::OkArgs {});
    let root = wire::Frame::create(
        &mut fbb,
        &wire::FrameArgs {
            request_id: 1,
            body_type: Body::NONE,
            body: Some(ok.as_union_value()),
        },
    );
    fbb.finish_size_prefixed(root, None);
    let err = decode_err(BytesMut::from(fbb.finished_data()), WireLimits::DEFAULT);
    // The type byte 0 is elided as the default, so the verifier sees a value without a type.
    assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
    assert!(err.is_fatal());
}

#[test]
fn an_unknown_body_type_is_consumed_and_the_next_frame_decodes() {
    // A newer peer's frame: a well-formed table behind a union tag this build does not know.
    let mut fbb = FlatBufferBuilder::new();
    let ok = wire::Ok::create(&mut fbb, &wire::OkArgs {});
    let root = wire::Frame::create(
        &mut fbb,
        &wire::FrameArgs {
            request_id: 3,
            body_type: Body(200),
            body: Some(ok.as_union_value()),
        },
    );
    fbb.finish_size_prefixed(root, None);
    let mut buf = BytesMut::from(fbb.finished_data());
    buf.extend_from_slice(&encode_unchecked(BodyT::Ok(Box::default())));

    let decoder = FrameDecoder::new(WireLimits::DEFAULT);
    let err = decoder.decode(&mut buf).unwrap_err();
    assert_eq!(err, ProtocolError::UnsupportedBody(200));
    assert!(!err.is_fatal());
    assert_eq!(err.code(), ErrorCode::UnsupportedFrame);
    let next = decoder.decode(&mut buf).unwrap().unwrap();
    assert_eq!(next.body_type(), Body::Ok);
    assert!(buf.is_empty());
}

#[test]
fn verify_accepts_exactly_one_whole_frame() {
    let (stream, each) = sample_stream();
    let limits = WireLimits::DEFAULT;
    let one = InFrame::verify(each[0].clone().freeze(), &limits).unwrap();
    assert_eq!(one.body_type(), Body::Hello);
    assert!(
        InFrame::verify(stream.clone().freeze(), &limits).is_err(),
        "two frames accepted as one"
    );
    assert!(
        InFrame::verify(each[0].clone().freeze().slice(..10), &limits).is_err(),
        "a truncated frame accepted"
    );
}

#[test]
fn the_encoder_refuses_what_the_decoder_would() {
    let limits = small_limits();
    let mut enc = Encoder::new(limits);
    let m = samples::message_bytes(10);
    let mut out = BytesMut::new();
    let item = PublishItem {
        sequence: 0,
        exchange: "",
        routing_key: "q",
        mandatory: false,
        message: &m,
    };
    let err = enc
        .publish(&mut out, 1, None, true, std::iter::repeat_n(item, 9))
        .unwrap_err();
    assert_eq!(
        err,
        ProtocolError::BatchTooLarge {
            what: "publish",
            count: 9,
            max: 8
        }
    );
    assert!(enc
        .publish(&mut out, 1, None, true, std::iter::empty())
        .is_err());
    let big = samples::message_bytes(limits.message_size_max as usize);
    let item = PublishItem {
        message: &big,
        ..item
    };
    assert!(matches!(
        enc.publish(&mut out, 1, None, true, [item]),
        Err(ProtocolError::MessageTooLarge { .. })
    ));
    assert!(out.is_empty(), "a refused frame left bytes in the output");
    // And a frame over frame_size_max from the object API path.
    let mut p = wire::PublishT::default();
    p.entries = (0..3)
        .map(|_| {
            let mut e = wire::PublishEntryT::default();
            e.message = vec![0; 100 * 1024];
            e
        })
        .collect();
    let err = enc
        .encode(
            &weir_protocol::frame(1, BodyT::Publish(Box::new(p))),
            &mut out,
        )
        .unwrap_err();
    assert!(matches!(err, ProtocolError::EncodeTooLarge { .. }), "{err}");
    assert!(out.is_empty());
}
